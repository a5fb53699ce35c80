package unpack

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// FuzzTar unpacks arbitrary tars: Tar may fail, but must not panic or
// create anything outside the layer directory.
func FuzzTar(f *testing.F) {
	if os.Geteuid() != 0 {
		f.Skip("needs root (devices, whiteouts, ownership)")
	}
	f.Add(lt.Tar(lt.Symlink("a", "/"), lt.FileString("a/x", "x")))
	f.Add(lt.Tar(lt.Symlink("a", "../.."), lt.Dir("a/b"), lt.Hardlink("a/b/h", "a/x")))
	f.Add(lt.Tar(lt.Dir("d"), lt.Whiteout("d/x"), lt.Opaque("d"), lt.FileString("../y", "y")))
	f.Add(lt.Tar(lt.FileString("f", "1"), lt.Dir("f"), lt.Symlink("f", "f"), lt.Hardlink("g", "f")))
	for _, layer := range lt.Corpus()[1:] {
		f.Add(lt.Tar(layer...))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		outside := t.TempDir()
		layer := filepath.Join(outside, "a", "layer")
		if err := os.MkdirAll(layer, 0o755); err != nil {
			t.Fatal(err)
		}
		Tar(bytes.NewReader(data), layer)
		ents, _ := os.ReadDir(outside)
		if len(ents) != 1 {
			t.Fatalf("written next to the layer: %v", ents)
		}
		if ents, _ := os.ReadDir(filepath.Join(outside, "a")); len(ents) != 1 {
			t.Fatalf("written next to the layer: %v", ents)
		}
	})
}
