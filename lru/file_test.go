package lru

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func writeAll(b []byte) func(io.Writer) error {
	return func(w io.Writer) error {
		// In uneven pieces, as a caller copying chunks would.
		for len(b) > 0 {
			n := min(len(b), 1000+len(b)%777)
			if _, err := w.Write(b[:n]); err != nil {
				return err
			}
			b = b[n:]
		}
		return nil
	}
}

func readFileEntry(t *testing.T, s *Store, key string) ([]byte, bool) {
	t.Helper()
	f, ok := s.OpenFile(key)
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

func TestFileEntry(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 64<<20)
	want := data(1, 9<<20+123)
	if err := s.PutFile("g/f-1", int64(len(want)), writeAll(want)); err != nil {
		t.Fatal(err)
	}
	// The file holds the data alone, at offset 0: the kernel reads it.
	raw, err := os.ReadFile(filepath.Join(dir, "g", "f-1"))
	if err != nil || !bytes.Equal(raw, want) {
		t.Fatalf("file entry on disk is not the data alone (err %v)", err)
	}
	got, ok := readFileEntry(t, s, "g/f-1")
	if !ok || !bytes.Equal(got, want) {
		t.Fatalf("OpenFile: ok %v, %d bytes, want %d", ok, len(got), len(want))
	}
	if u, _ := s.Usage(); u != diskBytes(t, dir) {
		t.Errorf("usage %d, files hold %d", u, diskBytes(t, dir))
	}
	if err := s.PutFile("g/f-1", int64(len(want)), func(io.Writer) error { t.Error("second put wrote"); return nil }); err != nil {
		t.Error(err)
	}
}

func TestFileEntryCorrupt(t *testing.T) {
	tests := []struct {
		name  string
		spoil func(t *testing.T, p string)
	}{
		{"flipped byte", func(t *testing.T, p string) {
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var b [1]byte
			f.ReadAt(b[:], 5<<20+7)
			b[0] ^= 0x40
			f.WriteAt(b[:], 5<<20+7)
		}},
		{"truncated", func(t *testing.T, p string) { os.Truncate(p, 4<<20) }},
		{"extended", func(t *testing.T, p string) { os.Truncate(p, 12<<20) }},
		{"label removed", func(t *testing.T, p string) {
			if err := removexattr(p, fileXattr); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, dir, 64<<20)
			want := data(2, 10<<20)
			if err := s.PutFile("g/f", int64(len(want)), writeAll(want)); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, "g", "f")
			tt.spoil(t, p)
			if _, ok := readFileEntry(t, s, "g/f"); ok {
				t.Fatal("a spoilt file entry was opened")
			}
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("spoilt entry not removed: %v", err)
			}
			if u, _ := s.Usage(); u != 0 {
				t.Errorf("usage %d after the only entry was dropped", u)
			}
			// Written again, it is served again.
			if err := s.PutFile("g/f", int64(len(want)), writeAll(want)); err != nil {
				t.Fatal(err)
			}
			if got, ok := readFileEntry(t, s, "g/f"); !ok || !bytes.Equal(got, want) {
				t.Error("rewritten entry not served")
			}
		})
	}
}

func TestPutFileFailures(t *testing.T) {
	tests := []struct {
		name string
		size int64
		fill func(io.Writer) error
		want error
	}{
		{"short", 100, writeAll(data(3, 99)), nil},
		{"long", 100, writeAll(data(3, 101)), nil},
		{"fill fails", 100, func(io.Writer) error { return io.ErrUnexpectedEOF }, io.ErrUnexpectedEOF},
		{"too large", 2 << 20, writeAll(data(3, 2<<20)), ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, dir, 1<<20)
			err := s.PutFile("g/f", tt.size, tt.fill)
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("PutFile: %v, want an error (%v)", err, tt.want)
			}
			if _, ok := s.OpenFile("g/f"); ok {
				t.Error("failed put left an entry")
			}
			if u, _ := s.Usage(); u != 0 {
				t.Errorf("usage %d after a failed put", u)
			}
			if ents, _ := os.ReadDir(s.tmpDir()); len(ents) > 0 {
				t.Errorf("%d temp files left", len(ents))
			}
		})
	}
}

// TestFileEntriesEvicted: file entries count against the bound and are
// evicted like the others.
func TestFileEntriesEvicted(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 10<<20)
	for i := range 8 {
		b := data(i, 3<<20)
		if err := s.PutFile("g/f"+string(rune('a'+i)), int64(len(b)), writeAll(b)); err != nil {
			t.Fatal(err)
		}
		if err := s.Put("g/c"+string(rune('a'+i)), data(i, 100)); err != nil {
			t.Fatal(err)
		}
		if d := diskBytes(t, dir); d > 10<<20 {
			t.Fatalf("after %d puts the files hold %d bytes, bound %d", i+1, d, 10<<20)
		}
	}
	if u, _ := s.Usage(); u != diskBytes(t, dir) {
		t.Errorf("usage %d, files hold %d", u, diskBytes(t, dir))
	}
}

func removexattr(p, name string) error { return unix.Removexattr(p, name) }

// TestFileEntryCheckedOncePerBoot: an entry is read whole to be checked
// the first time it is opened after a boot, or after its mtime changed;
// in between, a change that keeps the mtime (what only a deliberate writer
// does) goes unseen, and the next boot catches it.
func TestFileEntryCheckedOncePerBoot(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 64<<20)
	if s.boot == "" {
		t.Skip("no boot ID in /proc")
	}
	want := data(4, 9<<20)
	if err := s.PutFile("g/f", int64(len(want)), writeAll(want)); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "g", "f")
	spoil := func(keepMtime bool) {
		fi, _ := os.Stat(p)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte{^want[100]}, 100)
		f.Close()
		if keepMtime {
			os.Chtimes(p, fi.ModTime(), fi.ModTime())
		}
	}
	spoil(true)
	if _, ok := readFileEntry(t, s, "g/f"); !ok {
		t.Fatal("a stamped entry was read whole and refused within the boot")
	}
	s.boot = "00000000-0000-0000-0000-000000000000" // a new boot
	if _, ok := readFileEntry(t, s, "g/f"); ok {
		t.Fatal("after a new boot, a spoilt entry was opened")
	}

	// A write that changes the mtime is caught within the boot.
	s.boot = bootID()
	if err := s.PutFile("g/f", int64(len(want)), writeAll(want)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	spoil(false)
	if _, ok := readFileEntry(t, s, "g/f"); ok {
		t.Fatal("an entry written after its stamp was opened unchecked")
	}
}
