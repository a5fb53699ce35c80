package layertest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

// FuzzSeeds is a package's fuzz seed corpus: target name → seed name →
// the seed's values, in the order of the target's arguments ([]byte,
// string, int64 or bool).
type FuzzSeeds map[string]map[string][]any

// MaxFuzzSeed bounds the size of one seed file, so that seeds stay small:
// a few KiB of input, which the corpus format quotes (a zero byte, common
// in tar headers, takes four characters).
const MaxFuzzSeed = 16 << 10

// CheckFuzzSeeds checks that testdata/fuzz/TARGET/NAME exists for every
// seed, so that plain `go test` runs each fuzz target on them and `go test
// -fuzz` starts from them; with write, it writes them instead, in Go's
// corpus file format.
func CheckFuzzSeeds(t *testing.T, seeds FuzzSeeds, write bool) {
	t.Helper()
	for _, target := range sortedKeys(seeds) {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, name := range sortedKeys(seeds[target]) {
			data, err := FuzzCorpusFile(seeds[target][name]...)
			if err != nil {
				t.Fatalf("%s/%s: %v", target, name, err)
			}
			if len(data) > MaxFuzzSeed {
				t.Errorf("%s/%s: %d bytes; keep seeds under %d", target, name, len(data), MaxFuzzSeed)
			}
			path := filepath.Join(dir, name)
			if write {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, data, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if _, err := os.Stat(path); err != nil {
				t.Errorf("seed %s/%s missing (write the corpus with -write-seeds): %v", target, name, err)
			}
		}
	}
}

// FuzzCorpusFile encodes vals in the format of Go's fuzz corpus files.
func FuzzCorpusFile(vals ...any) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, v := range vals {
		switch v := v.(type) {
		case []byte:
			fmt.Fprintf(&b, "[]byte(%q)\n", v)
		case string:
			fmt.Fprintf(&b, "string(%q)\n", v)
		case int64:
			fmt.Fprintf(&b, "int64(%d)\n", v)
		case bool:
			fmt.Fprintf(&b, "bool(%t)\n", v)
		default:
			return nil, fmt.Errorf("fuzz corpus: values of type %T are not supported", v)
		}
	}
	return b.Bytes(), nil
}

func sortedKeys[V any](m map[string]V) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}
