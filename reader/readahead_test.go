package reader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// netBlob is an in-memory blob with a delay per request that logs requests
// and counts how many run at once; it can be made to fail.
type netBlob struct {
	data  []byte
	delay time.Duration
	fail  atomic.Bool

	mu     sync.Mutex // guards reqs, multi, cur and peak
	reqs   [][2]int64 // offset, length of each request
	multi  [][]int64  // offsets of each multi-range request
	cur    int
	peak   int
	multiR bool // implements multi-range reads
}

func (b *netBlob) Size() int64 { return int64(len(b.data)) }

func (b *netBlob) enter(off, n int64) {
	b.mu.Lock()
	b.reqs = append(b.reqs, [2]int64{off, n})
	b.cur++
	b.peak = max(b.peak, b.cur)
	b.mu.Unlock()
	time.Sleep(b.delay)
	b.mu.Lock()
	b.cur--
	b.mu.Unlock()
}

var errDown = errors.New("registry down")

func (b *netBlob) ReadAt(p []byte, off int64) (int, error) {
	b.enter(off, int64(len(p)))
	if b.fail.Load() {
		return 0, errDown
	}
	return bytes.NewReader(b.data).ReadAt(p, off)
}

// multiBlob is a netBlob that reads several ranges in one request.
type multiBlob struct{ *netBlob }

func (b multiBlob) ReadRangesAt(ctx context.Context, offs []int64, bufs [][]byte) error {
	b.mu.Lock()
	b.multi = append(b.multi, offs)
	b.mu.Unlock()
	b.enter(offs[0], -1)
	for i := range offs {
		copy(bufs[i], b.data[offs[i]:])
	}
	return nil
}

func (b *netBlob) requests() [][2]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([][2]int64(nil), b.reqs...)
}

func (b *netBlob) reset() {
	b.mu.Lock()
	b.reqs, b.multi, b.peak = nil, nil, 0
	b.mu.Unlock()
}

func buildNet(t *testing.T, chunk int, entries ...lt.Entry) (*netBlob, digest.Digest) {
	t.Helper()
	m, d := build(t, chunk, entries...)
	return &netBlob{data: m.data}, d
}

func readSeq(t *testing.T, l *Layer, n *Node, step int) []byte {
	t.Helper()
	var got []byte
	p := make([]byte, step)
	for off := int64(0); off < n.Size; off += int64(step) {
		k, err := l.ReadAt(context.Background(), n, p, off)
		if err != nil && err != io.EOF {
			t.Fatalf("ReadAt(%d): %v", off, err)
		}
		got = append(got, p[:k]...)
	}
	return got
}

func TestSequentialReadAhead(t *testing.T) {
	content := lt.Random("seq", 40<<20) // 640 chunks of 64 KiB
	blob, d := buildNet(t, 64<<10, lt.File("f", content))
	blob.delay = 20 * time.Millisecond
	l, err := Open(context.Background(), blob, WithTOCDigest(d), WithCache(NewCache(256<<20)))
	if err != nil {
		t.Fatal(err)
	}
	n := lookup(t, l, "f")
	blob.reset()
	start := time.Now()
	if got := readSeq(t, l, n, 128<<10); !bytes.Equal(got, content) {
		t.Fatal("content differs")
	}
	elapsed := time.Since(start)
	reqs := blob.requests()
	for i, r := range reqs {
		if r[1] > aheadRequest {
			t.Errorf("request %d reads %d bytes, more than %d", i, r[1], aheadRequest)
		}
	}
	// 40 MiB: the read's own 4 MiB, then read-ahead requests of up to
	// 16 MiB, a few partial ones where read-ahead meets the reader.
	if len(reqs) < 3 || len(reqs) > 12 {
		t.Errorf("%d requests for 40 MiB, want 3-12: %v", len(reqs), reqs)
	}
	// One request at a time would take len(reqs) × delay.
	if blob.peak < 2 {
		t.Errorf("read-ahead ran %d requests at once, want parallel requests", blob.peak)
	}
	t.Logf("%d requests, peak %d in flight, %s (serial would be ≥ %s)", len(reqs), blob.peak, elapsed, time.Duration(len(reqs))*blob.delay)

	// A random read pattern starts no read-ahead.
	l2, _ := Open(context.Background(), blob, WithTOCDigest(d), WithCache(NewCache(256<<20)))
	n2 := lookup(t, l2, "f")
	blob.reset()
	p := make([]byte, 4096)
	for _, off := range []int64{37 << 20, 3 << 20} {
		if _, err := l2.ReadAt(context.Background(), n2, p, off); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond) // any stray read-ahead would show by now
	if r := blob.requests(); len(r) != 2 {
		t.Errorf("2 random reads made %d requests: %v", len(r), r)
	}
}

func TestOneFetchPerChunk(t *testing.T) {
	content := lt.Random("one", 1<<20)
	blob, d := buildNet(t, 64<<10, lt.File("f", content))
	blob.delay = 50 * time.Millisecond
	l, err := Open(context.Background(), blob, WithTOCDigest(d))
	if err != nil {
		t.Fatal(err)
	}
	n := lookup(t, l, "f")
	blob.reset()
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(g%4) * (64 << 10)
			p := make([]byte, 1000)
			if _, err := l.ReadAt(context.Background(), n, p, off); err != nil || !bytes.Equal(p, content[off:off+1000]) {
				t.Errorf("ReadAt(%d): %v", off, err)
			}
		}()
	}
	wg.Wait()
	// Each chunk once: requests may split the file, never repeat a chunk.
	seen := map[int64]bool{}
	for _, r := range blob.requests() {
		for _, c := range n.chunks {
			if c.blobOff >= r[0] && c.blobEnd <= r[0]+r[1] {
				if seen[c.blobOff] {
					t.Errorf("chunk at %d fetched twice: %v", c.blobOff, blob.requests())
				}
				seen[c.blobOff] = true
			}
		}
	}
}

func TestCoalescing(t *testing.T) {
	content := lt.Random("gap", 2<<20) // 32 chunks of 64 KiB
	tests := []struct {
		name   string
		cached func(i int) bool // chunks read before
		multi  bool
		want   int // requests (single or multi-range) for the final read
		ranges int // ranges in the multi-range request
	}{
		// Every other chunk cached: gaps of one chunk (~64 KiB + gzip
		// overhead: more than maxGap) -> separate ranges.
		{name: "gaps over 64 KiB, multi-range", cached: func(i int) bool { return i%2 == 1 }, multi: true, want: 1, ranges: maxRanges},
		{name: "gaps over 64 KiB, single ranges", cached: func(i int) bool { return i%2 == 1 }, want: maxRanges},
		{name: "nothing cached: one range", cached: func(int) bool { return false }, multi: true, want: 1, ranges: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nb, d := buildNet(t, 64<<10, lt.File("f", content))
			var b Blob = nb
			if tt.multi {
				b = multiBlob{nb}
			}
			l, err := Open(context.Background(), b, WithTOCDigest(d), WithCache(NewCache(64<<20)))
			if err != nil {
				t.Fatal(err)
			}
			n := lookup(t, l, "f")
			p := make([]byte, 10)
			for i := range n.chunks {
				if tt.cached(i) {
					c := &n.chunks[i]
					data, _ := decode(c, nb.data[c.blobOff:c.blobEnd])
					l.cache.set(l.key(c), data)
				}
			}
			nb.reset()
			if _, err := l.ReadAt(context.Background(), n, p, 0); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond) // let parallel single-range reads finish
			reqs := nb.requests()
			if len(reqs) != tt.want {
				t.Errorf("%d requests, want %d: %v", len(reqs), tt.want, reqs)
			}
			if tt.ranges > 0 && (len(nb.multi) != 1 || len(nb.multi[0]) != tt.ranges) {
				t.Errorf("multi-range requests %v, want one of %d ranges", nb.multi, tt.ranges)
			}
			// Whatever was fetched reads back right.
			if got := readSeq(t, l, n, 100_000); !bytes.Equal(got, content) {
				t.Error("content differs")
			}
		})
	}
}

func TestFailureRemembered(t *testing.T) {
	content := lt.Random("fail", 256<<10)
	blob, d := buildNet(t, 64<<10, lt.File("f", content))
	l, err := Open(context.Background(), blob, WithTOCDigest(d))
	if err != nil {
		t.Fatal(err)
	}
	n := lookup(t, l, "f")
	blob.reset()
	blob.fail.Store(true)
	p := make([]byte, 100)
	for range 10 {
		if _, err := l.ReadAt(context.Background(), n, p, 0); !errors.Is(err, errDown) {
			t.Fatalf("ReadAt = %v, want %v", err, errDown)
		}
	}
	if r := len(blob.requests()); r != 1 {
		t.Errorf("10 reads within %s made %d requests, want 1", failureMemory, r)
	}
	blob.fail.Store(false)
	time.Sleep(failureMemory + 50*time.Millisecond)
	if _, err := l.ReadAt(context.Background(), n, p, 0); err != nil || !bytes.Equal(p, content[:100]) {
		t.Fatalf("ReadAt after the failure expired: %v", err)
	}
}

// TestNeighbourFiles: reading the small files of a directory one after the
// other costs a request per neighbourBytes, not one per file.
func TestNeighbourFiles(t *testing.T) {
	entries := []lt.Entry{lt.Dir("many")}
	want := map[string][]byte{}
	for i := range 200 {
		name := fmt.Sprintf("many/f%03d", i)
		data := lt.Random(name, 100+i*37)
		want[name] = data
		entries = append(entries, lt.File(name, data))
	}
	blob, d := buildNet(t, 64<<10, entries...)
	l, err := Open(context.Background(), blob, WithTOCDigest(d))
	if err != nil {
		t.Fatal(err)
	}
	blob.reset()
	dir := lookup(t, l, "many")
	for _, e := range dir.Children() {
		got := readAll(t, l, e.Node)
		if !bytes.Equal(got, want["many/"+e.Name]) {
			t.Fatalf("%s differs", e.Name)
		}
	}
	if r := blob.requests(); len(r) > 3 {
		t.Errorf("reading 200 small files made %d requests, want at most 3", len(r))
	}
}
