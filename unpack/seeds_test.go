package unpack

import (
	"bytes"
	"flag"
	"strings"
	"testing"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

var writeSeeds = flag.Bool("write-seeds", false, "write the fuzz seed corpus to testdata/fuzz (go test -run TestFuzzSeeds -write-seeds)")

// TestFuzzSeeds checks that testdata/fuzz holds the seed corpus
// fuzzSeeds describes; -write-seeds writes it.
func TestFuzzSeeds(t *testing.T) {
	lt.CheckFuzzSeeds(t, fuzzSeeds(), *writeSeeds)
}

// fuzzSeeds is FuzzTar's seed corpus: small tars of the kinds a hostile
// layer holds. Tar headers are mostly zero bytes, which the corpus format
// spells in four characters each: the seeds leave out the end-of-archive
// blocks (a tar that ends after an entry reads the same) and keep to a few
// entries.
func fuzzSeeds() lt.FuzzSeeds {
	tar := func(entries ...lt.Entry) []any {
		b := lt.Tar(entries...)
		if end := len(b) - 1024; end >= 0 && !bytes.ContainsFunc(b[end:], func(r rune) bool { return r != 0 }) {
			b = b[:end]
		}
		return []any{b}
	}
	full := lt.Tar(lt.FileString("f", strings.Repeat("x", 600)), lt.FileString("g", "g"))
	return lt.FuzzSeeds{"FuzzTar": {
		"symlink-to-root":       tar(lt.Symlink("a", "/"), lt.FileString("a/x", "x")),
		"symlink-up":            tar(lt.Symlink("a", "../.."), lt.Dir("a/b"), lt.Hardlink("a/b/h", "a/x")),
		"whiteouts-opaque-up":   tar(lt.Dir("d"), lt.Whiteout("d/x"), lt.Opaque("d"), lt.FileString("../y", "y")),
		"type-changes":          tar(lt.FileString("f", "1"), lt.Dir("f"), lt.Symlink("f", "f"), lt.Hardlink("g", "f")),
		"hardlinks":             tar(lt.FileString("a", "x"), lt.Hardlink("b", "a"), lt.Hardlink("c", "/etc/passwd"), lt.Hardlink("d", "../a")),
		"hardlink-chain":        tar(lt.FileString("a", "x"), lt.Hardlink("b", "a"), lt.Hardlink("c", "b"), lt.Hardlink("a", "c")),
		"devices":               tar(lt.Char("null", 1, 3), lt.Block("sda", 8, 0), lt.Fifo("p"), lt.Char("wh", 0, 0)),
		"modes-owners-xattrs":   tar(lt.FileString("suid", "x", lt.Mode(0o4755), lt.Owner(1000, 1000), lt.Xattr("user.k", "v")), lt.Dir("o", lt.Xattr("trusted.overlay.opaque", "y"))),
		"long-name":             tar(lt.FileString(strings.Repeat("n/", 60)+"f", "deep")),
		"whiteout-of-root":      tar(lt.Whiteout("."), lt.Whiteout(".."), lt.Opaque(".")),
		"truncated-in-a-file":   {full[:512+300]},
		"truncated-in-a-header": {full[:512+1024+100]},
	}}
}
