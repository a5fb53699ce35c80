package reader

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
	"github.com/stargz-mount/stargz-mount/lru"
)

func readSaved(t *testing.T, l *Layer, n *Node) ([]byte, bool) {
	t.Helper()
	f, ok := l.SavedFile(n)
	if !ok {
		return nil, false
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b, true
}

// TestSaveFile: a file whose chunks are cached is saved whole, in the
// store, and a fresh process opens the copy with the registry down; a
// spoilt copy is refused and the file is still read right from its chunks.
func TestSaveFile(t *testing.T) {
	data := lt.Random("saved", 3<<20+4321)
	blob, d := build(t, 64<<10, lt.Dir("d"), lt.File("d/f", data), lt.FileString("small", "hi\n"))
	dir := t.TempDir()
	st, err := lru.Open(dir, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const name = "sha256:2222"

	c := NewCache(32<<20, WithStore(st))
	l := open(t, blob, d, WithName(name), WithCache(c))
	f := lookup(t, l, "d", "f")
	if err := l.SaveFile(context.Background(), f); !errors.Is(err, ErrNotCached) {
		t.Fatalf("SaveFile before any read: %v, want ErrNotCached", err)
	}
	if _, ok := l.SavedFile(f); ok {
		t.Fatal("a file never saved was opened")
	}
	reads := blob.reads.Load()
	readAll(t, l, f)
	if l.Cached(f) != true {
		t.Fatal("Cached false after reading the whole file")
	}
	if err := l.SaveFile(context.Background(), f); err != nil {
		t.Fatal(err)
	}
	if err := l.SaveFile(context.Background(), lookup(t, l, "d")); err == nil {
		t.Error("SaveFile of a directory succeeded")
	}
	c.Close()
	fetched := blob.reads.Load() - reads

	c2 := NewCache(32<<20, WithStore(st))
	defer c2.Close()
	l2, err := Open(context.Background(), deadBlob{int64(len(blob.data))}, WithTOCDigest(d), WithName(name), WithCache(c2))
	if err != nil {
		t.Fatal(err)
	}
	f2 := lookup(t, l2, "d", "f")
	got, ok := readSaved(t, l2, f2)
	l2.CountSavedOpen()
	if !ok || !bytes.Equal(got, data) {
		t.Fatalf("saved copy: ok %v, right bytes %v", ok, bytes.Equal(got, data))
	}
	if s := l2.Stats(); s.SavedOpens != 1 || s.MemoryMisses != 0 {
		t.Errorf("stats after one open of the saved copy: %+v", s)
	}
	if s := l.Stats(); s.FilesSaved != 1 {
		t.Errorf("FilesSaved %d, want 1", s.FilesSaved)
	}
	t.Logf("saved a %d-byte file after %d reads of the blob", len(data), fetched)

	// Spoil the copy: refused, and dropped; the chunks still serve.
	spoilt := 0
	filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() && filepath.Base(p) == l.fileKey(f)[len(name)+1:] {
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 1
			os.WriteFile(p, b, 0o600) // keeps the inode and its xattr
			spoilt++
		}
		return nil
	})
	if spoilt != 1 {
		t.Fatalf("found %d saved copies to spoil, want 1", spoilt)
	}
	if _, ok := readSaved(t, l2, f2); ok {
		t.Fatal("a spoilt copy was opened")
	}
	if got := readAll(t, l2, f2); !bytes.Equal(got, data) {
		t.Error("read from the chunks after the copy was dropped: wrong bytes")
	}
	if _, ok := readSaved(t, l2, f2); ok {
		t.Error("the spoilt copy is still there")
	}
}

// TestSaveFileWithoutStore: without a FileStore there is nothing to save
// to, and nothing saved.
func TestSaveFileWithoutStore(t *testing.T) {
	blob, d := build(t, 64<<10, lt.File("f", lt.Random("x", 200_000)))
	l := open(t, blob, d)
	f := lookup(t, l, "f")
	readAll(t, l, f)
	if err := l.SaveFile(context.Background(), f); !errors.Is(err, ErrNoFileStore) {
		t.Errorf("SaveFile without a store: %v, want ErrNoFileStore", err)
	}
	if _, ok := l.SavedFile(f); ok {
		t.Error("SavedFile without a store succeeded")
	}
}

// TestSaveFileTooLarge: a file over an eighth of the disk bound is not
// saved beside its chunks.
func TestSaveFileTooLarge(t *testing.T) {
	blob, d := build(t, 64<<10, lt.File("f", lt.Random("big", 300_000)))
	st, err := lru.Open(t.TempDir(), 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c := NewCache(8<<20, WithStore(st))
	defer c.Close()
	l := open(t, blob, d, WithName("sha256:3333"), WithCache(c))
	f := lookup(t, l, "f")
	readAll(t, l, f)
	if err := l.SaveFile(context.Background(), f); !errors.Is(err, ErrTooLarge) {
		t.Errorf("SaveFile of 300 kB with a 2 MiB bound: %v, want ErrTooLarge", err)
	}
}
