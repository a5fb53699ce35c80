package main

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true},
		{"4096", 4096, true},
		{"64MiB", 64 << 20, true},
		{"10GiB", 10 << 30, true},
		{"1.5G", 3 << 29, true},
		{"256mib", 256 << 20, true},
		{"100MB", 100e6, true},
		{"12 KiB", 12 << 10, true},
		{"", 0, false},
		{"lots", 0, false},
		{"-1", 0, false},
		{"99999999999TiB", 0, false},
	}
	for _, tt := range tests {
		got, err := parseSize(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != tt.want) {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestInspect(t *testing.T) {
	host := lt.InProcessRegistry(t)
	es, err := lt.Estargz(lt.Tar(lt.FileString("a", "prioritized"), lt.FileString("b", "later")),
		estargz.WithPrioritizedFiles([]string{"a"}))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := lt.Gzip(lt.Tar(lt.FileString("c", "plain")))
	if err != nil {
		t.Fatal(err)
	}
	zc, err := lt.ZstdChunked(lt.Tar(lt.FileString("z", "zstd:chunked")))
	if err != nil {
		t.Fatal(err)
	}
	img, err := lt.Image(plain, es, zc)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/inspect:1")

	out, err := exec.Command(binary, "inspect", "--json", host+"/inspect:1").Output()
	if err != nil {
		t.Fatalf("inspect: %v", err)
	}
	var info imageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("inspect --json output: %v\n%s", err, out)
	}
	d, _ := img.Digest()
	if info.Digest != d.String() || !strings.HasPrefix(info.Platform, "linux/") || len(info.Layers) != 3 {
		t.Fatalf("inspect = %+v", info)
	}
	if l := info.Layers[0]; l.EStargz || l.Format != "gzip" || l.Digest != plain.Digest.String() || l.Size != int64(len(plain.Data)) {
		t.Errorf("plain layer = %+v", l)
	}
	l := info.Layers[1]
	if !l.EStargz || l.Format != "estargz" || l.TOCDigest != es.TOCDigest || l.Entries == 0 || l.PrioritizedBytes <= 0 ||
		l.UncompressedSize != es.UncompressedSize || l.Error != "" {
		t.Errorf("eStargz layer = %+v", l)
	}

	if l := info.Layers[2]; l.Format != "zstd:chunked" || l.Entries == 0 || l.TOCDigest == "" || l.Error != "" {
		t.Errorf("zstd:chunked layer = %+v", l)
	}

	table, err := exec.Command(binary, "inspect", host+"/inspect:1").Output()
	if err != nil || !strings.Contains(string(table), "ESTARGZ") || !strings.Contains(string(table), d.String()) {
		t.Errorf("inspect table: %v\n%s", err, table)
	}
}
