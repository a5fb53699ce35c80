package reader

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// mapStore is a Store in memory that counts its traffic.
type mapStore struct {
	mu         sync.Mutex // guards m, gets and puts
	m          map[string][]byte
	gets, puts int
}

func (s *mapStore) Get(k string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gets++
	b, ok := s.m[k]
	return b, ok
}

func (s *mapStore) Put(k string, b []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.puts++
	s.m[k] = append([]byte(nil), b...)
	return nil
}

// deadBlob fails every read, like a registry that is down.
type deadBlob struct{ size int64 }

func (d deadBlob) Size() int64                             { return d.size }
func (d deadBlob) ReadAt(p []byte, off int64) (int, error) { return 0, errors.New("registry down") }

// TestStore: chunks and the TOC go to the store; a fresh process (new
// memory cache) opens and reads the layer from the store alone.
func TestStore(t *testing.T) {
	data := lt.Random("data", 700_000)
	blob, d := build(t, 64<<10, lt.Dir("d"), lt.File("d/f", data), lt.FileString("small", "hi\n"))
	st := &mapStore{m: map[string][]byte{}}
	const name = "sha256:1111"

	c := NewCache(8<<20, WithStore(st))
	l := open(t, blob, d, WithName(name), WithCache(c))
	if got := readAll(t, l, lookup(t, l, "d", "f")); !bytes.Equal(got, data) {
		t.Fatal("first read: wrong bytes")
	}
	readAll(t, l, lookup(t, l, "small"))
	c.Close()
	for k := range st.m {
		if !strings.HasPrefix(k, name+"/") {
			t.Errorf("store key %q is not under the layer's name", k)
		}
	}
	if _, ok := st.m[name+"/toc"]; !ok || len(st.m) < 12 {
		t.Fatalf("store holds %d entries, want the TOC and every chunk", len(st.m))
	}

	tests := []struct {
		name string
		blob Blob
	}{
		{"registry down", deadBlob{int64(len(blob.data))}},
		{"registry up", blob},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reads := blob.reads.Load()
			c := NewCache(8<<20, WithStore(st))
			defer c.Close()
			l, err := Open(context.Background(), tt.blob, WithTOCDigest(d), WithName(name), WithCache(c))
			if err != nil {
				t.Fatalf("Open from the store: %v", err)
			}
			if got := readAll(t, l, lookup(t, l, "d", "f")); !bytes.Equal(got, data) {
				t.Fatal("wrong bytes from the store")
			}
			if n := blob.reads.Load() - reads; n != 0 {
				t.Errorf("%d blob reads with everything in the store", n)
			}
			if s := l.Stats(); s.DiskHits == 0 || s.DiskMisses != 0 || s.MemoryMisses != s.DiskHits {
				t.Errorf("stats: %d memory misses, %d disk hits, %d disk misses; want every memory miss a disk hit",
					s.MemoryMisses, s.DiskHits, s.DiskMisses)
			}
		})
	}

	t.Run("wrong TOC in the store is refetched", func(t *testing.T) {
		bad := append([]byte(nil), st.m[name+"/toc"]...)
		bad[len(bad)/2] ^= 0xff
		st.m[name+"/toc"] = bad
		reads := blob.reads.Load()
		c := NewCache(8<<20, WithStore(st))
		defer c.Close()
		l := open(t, blob, d, WithName(name), WithCache(c))
		if got := readAll(t, l, lookup(t, l, "small")); string(got) != "hi\n" {
			t.Errorf("small = %q", got)
		}
		if blob.reads.Load() == reads {
			t.Error("the damaged TOC was used without fetching it again")
		}
	})
}

// TestStoreLoadAhead: a sequential reader of a file the store holds gets
// the following chunks loaded from the store before it asks for them.
func TestStoreLoadAhead(t *testing.T) {
	data := lt.Random("data", 700_000)
	blob, d := build(t, 64<<10, lt.File("f", data))
	st := &mapStore{m: map[string][]byte{}}
	const name = "sha256:2222"
	c := NewCache(8<<20, WithStore(st))
	first := open(t, blob, d, WithName(name), WithCache(c))
	readAll(t, first, lookup(t, first, "f"))
	c.Close()

	c = NewCache(8<<20, WithStore(st))
	defer c.Close()
	l, err := Open(context.Background(), deadBlob{int64(len(blob.data))}, WithTOCDigest(d), WithName(name), WithCache(c))
	if err != nil {
		t.Fatal(err)
	}
	f := lookup(t, l, "f")
	st.mu.Lock()
	before := st.gets
	st.mu.Unlock()
	buf := make([]byte, 64<<10)
	for off := int64(0); off < 3*64<<10; off += 64 << 10 {
		if _, err := l.ReadAt(context.Background(), f, buf, off); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		st.mu.Lock()
		gets := st.gets - before
		st.mu.Unlock()
		if gets >= 8 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d store reads after reading 3 chunks sequentially; want the chunks ahead loaded too", gets)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := readAll(t, l, f); !bytes.Equal(got, data) {
		t.Error("wrong bytes")
	}
}

// TestPauseWrites: while paused, chunks wait in the queue (and are served
// from it); on resume they reach the store.
func TestPauseWrites(t *testing.T) {
	st := &mapStore{m: map[string][]byte{}}
	c := NewCache(8<<20, WithStore(st))
	resume := c.pauseWrites()
	c.set("sha256:1@0+0", []byte("chunk"))
	time.Sleep(50 * time.Millisecond)
	st.mu.Lock()
	puts := st.puts
	st.mu.Unlock()
	if puts != 0 {
		t.Fatalf("%d store writes while paused", puts)
	}
	if b, ok := c.queuedBytes(storeKey("sha256:1@0+0")); !ok || string(b) != "chunk" {
		t.Error("a queued chunk is not served from the queue")
	}
	resume()
	resume() // a second call does nothing
	c.Close()
	if _, ok := st.m["sha256:1/0+0"]; !ok {
		t.Error("the chunk never reached the store after resume")
	}
}
