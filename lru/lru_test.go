package lru

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func data(seed, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func open(t *testing.T, dir string, max int64) *Store {
	t.Helper()
	s, err := Open(dir, max)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// diskBytes sums the blocks the entries' files occupy.
func diskBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && filepath.Base(filepath.Dir(p)) != ".locks" && d.Name() != ".usage" && d.Name() != ".users" {
			fi, _ := d.Info()
			n += (fi.Size() + blockSize - 1) / blockSize * blockSize
		}
		return nil
	})
	return n
}

func TestPutGet(t *testing.T) {
	s := open(t, t.TempDir(), 1<<20)
	tests := []struct {
		name string
		key  string
		data []byte
		ok   bool
	}{
		{"small", "g/a", []byte("hello"), true},
		{"empty", "g/empty", []byte{}, true},
		{"digest-like key", "sha256:0123abcd/4096+0", data(1, 70000), true},
		{"no group", "plain", []byte("x"), false},
		{"dot-dot", "../x", []byte("x"), false},
		{"slash in name", "g/a/b", []byte("x"), false},
		{"hidden group", ".locks/x", []byte("x"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Put(tt.key, tt.data)
			if (err == nil) != tt.ok {
				t.Fatalf("Put: %v, want ok=%v", err, tt.ok)
			}
			got, ok := s.Get(tt.key)
			if ok != tt.ok || (ok && !bytes.Equal(got, tt.data)) {
				t.Fatalf("Get = %d bytes, %v", len(got), ok)
			}
		})
	}
	if _, ok := s.Get("g/missing"); ok {
		t.Error("hit for a missing key")
	}
	if err := s.Put("g/huge", make([]byte, 2<<20)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Put larger than the bound: %v", err)
	}
	if err := s.Remove("g/a"); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Get("g/a"); ok {
		t.Error("hit after Remove")
	}
}

// TestCorruptEntry damages stored entries in different ways: each is a
// miss, is removed, and a new Put repairs it.
func TestCorruptEntry(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 1<<20)
	want := data(2, 10000)
	tests := []struct {
		name   string
		damage func(b []byte) []byte
	}{
		{"flipped data byte", func(b []byte) []byte { b[headerSize+5000] ^= 1; return b }},
		{"flipped checksum", func(b []byte) []byte { b[5] ^= 1; return b }},
		{"truncated", func(b []byte) []byte { return b[:len(b)-100] }},
		{"too short for a header", func(b []byte) []byte { return b[:3] }},
		{"wrong magic", func(b []byte) []byte { b[0] = 'X'; return b }},
		{"appended bytes", func(b []byte) []byte { return append(b, 0) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := "g/x"
			if err := s.Put(key, want); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, "g", "x")
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, tt.damage(b), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, ok := s.Get(key); ok {
				t.Fatal("corrupt entry served")
			}
			if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("corrupt entry kept: %v", err)
			}
			if err := s.Put(key, want); err != nil {
				t.Fatal(err)
			}
			if got, ok := s.Get(key); !ok || !bytes.Equal(got, want) {
				t.Fatal("not repaired by Put")
			}
			s.Remove(key)
		})
	}
	// A damaged entry of a different size gives back what it occupied:
	// the count may stay above what is on disk, never below.
	if u, _ := s.Usage(); u < 0 || u > 3*cost(10000) {
		t.Errorf("usage %d after removing everything", u)
	}
}

// TestBound writes three times the bound, reading back some entries so they
// stay, and checks the bound after every Put.
func TestBound(t *testing.T) {
	const max = 1 << 20
	dir := t.TempDir()
	s := open(t, dir, max)
	hot := data(99, 30000)
	if err := s.Put("g/hot", hot); err != nil {
		t.Fatal(err)
	}
	written := int64(0)
	for i := 0; written < 3*max; i++ {
		b := data(i, 20000+i%7*1000)
		if err := s.Put(fmt.Sprintf("g/%d", i), b); err != nil {
			t.Fatal(err)
		}
		written += int64(len(b))
		if d := diskBytes(t, dir); d > max {
			t.Fatalf("after %d bytes written: %d bytes on disk, bound %d", written, d, max)
		}
		if i%5 == 0 {
			// Keep it recently used (Get touches only stale mtimes).
			os.Chtimes(filepath.Join(dir, "g", "hot"), time.Now().Add(-time.Hour), time.Now().Add(-time.Hour))
			if _, ok := s.Get("g/hot"); !ok {
				t.Fatalf("recently used entry evicted after %d bytes", written)
			}
		}
	}
	if _, ok := s.Get("g/0"); ok {
		t.Error("oldest entry survived three times the bound")
	}
	u, _ := s.Usage()
	if d := diskBytes(t, dir); u < d || u > max {
		t.Errorf("count %d, on disk %d, bound %d", u, d, max)
	}
}

// TestExternalUsage: bytes counted outside the store share its bound;
// writes evict to make room for them, and fail if nothing can.
func TestExternalUsage(t *testing.T) {
	const max = 1 << 20
	dir := t.TempDir()
	var ext atomic.Int64
	s, err := Open(dir, max, WithExternalUsage(ext.Load))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	put := func(i int) error { return s.Put(fmt.Sprintf("g/%d", i), data(i, 20000)) }
	check := func(t *testing.T, when string) {
		t.Helper()
		if d, e := diskBytes(t, dir), ext.Load(); d+e > max {
			t.Fatalf("%s: %d bytes on disk and %d outside, bound %d", when, d, e, max)
		}
	}
	tests := []struct {
		name     string
		external int64
		writes   int
		err      error
	}{
		{"no external usage fills the bound", 0, 60, nil},
		{"external usage appears: writes evict for it", 600 << 10, 60, nil},
		{"external usage grows", 900 << 10, 20, nil},
		{"external usage shrinks", 100 << 10, 60, nil},
		{"external usage takes it all", max, 1, ErrFull},
	}
	i := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ext.Store(tt.external)
			for range tt.writes {
				i++
				if err := put(i); !errors.Is(err, tt.err) {
					t.Fatalf("Put %d: %v, want %v", i, err, tt.err)
				}
				check(t, fmt.Sprintf("after Put %d", i))
			}
			u, _ := s.Usage()
			if d := diskBytes(t, dir); u < d || u+tt.external > max {
				t.Errorf("count %d, on disk %d, outside %d, bound %d", u, d, tt.external, max)
			}
		})
	}
	if s.Has(fmt.Sprintf("g/%d", i)) {
		t.Error("an entry that did not fit was stored")
	}
}

// TestRecount: a count lost or wrong after a crash, and a crashed writer's
// temp file, are repaired by the next process that opens the store alone.
func TestRecount(t *testing.T) {
	tests := []struct {
		name   string
		damage func(dir string)
	}{
		{"count file missing", func(dir string) { os.Remove(filepath.Join(dir, ".usage")) }},
		{"count too high", func(dir string) { os.WriteFile(filepath.Join(dir, ".usage"), []byte("999999\n"), 0o600) }},
		{"count too low", func(dir string) { os.WriteFile(filepath.Join(dir, ".usage"), []byte("0\n"), 0o600) }},
		{"count garbage", func(dir string) { os.WriteFile(filepath.Join(dir, ".usage"), []byte("x"), 0o600) }},
		{"stale temp file", func(dir string) { os.WriteFile(filepath.Join(dir, ".tmp", "put-1"), make([]byte, 9000), 0o600) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			for i := range 10 {
				s.Put(fmt.Sprintf("g/%d", i), data(i, 5000))
			}
			want, _ := s.Usage()
			s.Close()
			tt.damage(dir)
			s = open(t, dir, 1<<20)
			if got, _ := s.Usage(); got != want {
				t.Errorf("count %d after reopening, want %d", got, want)
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, ".tmp")); len(ents) != 0 {
				t.Errorf("%d temp files left", len(ents))
			}
		})
	}
}

// TestConcurrentStores fills one directory from two stores (as two
// processes would: flocks on separate open files) and many goroutines.
func TestConcurrentStores(t *testing.T) {
	const max = 2 << 20
	dir := t.TempDir()
	a, b := open(t, dir, max), open(t, dir, max)
	var wg sync.WaitGroup
	for g := range 8 {
		s := a
		if g%2 == 1 {
			s = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 60 {
				key := fmt.Sprintf("g/%d", (g/2)*1000+i) // pairs of goroutines share keys
				d := data(g/2*1000+i, 30000)
				if err := s.Put(key, d); err != nil {
					t.Error(err)
					return
				}
				if got, ok := s.Get(key); ok && !bytes.Equal(got, d) {
					t.Errorf("%s: wrong bytes", key)
				}
			}
		}()
	}
	wg.Wait()
	u, _ := a.Usage()
	if d := diskBytes(t, dir); d > max || u != d {
		t.Errorf("on disk %d, count %d, bound %d", d, u, max)
	}
}

func TestHoldAndPrune(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 10<<20)
	other := open(t, dir, 10<<20) // a second process
	for _, g := range []string{"live", "idle", "old"} {
		for i := range 4 {
			if err := s.Put(fmt.Sprintf("%s/%d", g, i), data(i, 8000)); err != nil {
				t.Fatal(err)
			}
		}
	}
	past := time.Now().Add(-time.Hour)
	for i := range 4 {
		os.Chtimes(filepath.Join(dir, "old", fmt.Sprint(i)), past, past)
		os.Chtimes(filepath.Join(dir, "live", fmt.Sprint(i)), past.Add(-time.Hour), past.Add(-time.Hour))
	}
	release, err := s.Hold("live")
	if err != nil {
		t.Fatal(err)
	}
	groups, err := other.Groups()
	if err != nil {
		t.Fatal(err)
	}
	inUse := map[string]bool{}
	for _, g := range groups {
		inUse[g.Name] = g.InUse
		if g.Entries != 4 || g.Bytes != 4*cost(8000) {
			t.Errorf("group %+v", g)
		}
	}
	if len(groups) != 3 || !inUse["live"] || inUse["idle"] || inUse["old"] {
		t.Errorf("groups %+v", groups)
	}
	if _, err := other.RemoveGroup("live"); !errors.Is(err, ErrBusy) {
		t.Errorf("RemoveGroup of a held group: %v", err)
	}
	// Pruning to 8 entries' worth must take "old" (least recently used
	// of the groups not held), not "live" (older, but held).
	freed, err := other.Prune(8 * cost(8000))
	if err != nil {
		t.Fatal(err)
	}
	if freed != 4*cost(8000) {
		t.Errorf("freed %d", freed)
	}
	for _, k := range []string{"live/0", "idle/0"} {
		if !s.Has(k) {
			t.Errorf("%s pruned", k)
		}
	}
	if s.Has("old/0") {
		t.Error("old/0 kept")
	}
	// Pruning everything still keeps the held group.
	if _, err := other.Prune(0); err != nil {
		t.Fatal(err)
	}
	if !s.Has("live/3") || s.Has("idle/0") {
		t.Error("prune to 0 took a held group or kept an idle one")
	}
	release()
	if freed, err := other.RemoveGroup("live"); err != nil || freed != 4*cost(8000) {
		t.Errorf("RemoveGroup after release: %d, %v", freed, err)
	}
	if u, _ := s.Usage(); u != 0 {
		t.Errorf("usage %d, want 0", u)
	}
}

func BenchmarkGet(b *testing.B) {
	s, err := Open(b.TempDir(), 1<<30)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	d := data(1, 4<<20)
	s.Put("g/x", d)
	b.SetBytes(int64(len(d)))
	for b.Loop() {
		if _, ok := s.Get("g/x"); !ok {
			b.Fatal("miss")
		}
	}
}
