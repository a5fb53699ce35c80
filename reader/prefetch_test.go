package reader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// prioritized builds a layer whose files p0..p9 (3 chunks each) are
// prioritized and r0..r9 are not.
func prioritized(t *testing.T, prio []string) (*memBlob, digest.Digest, map[string][]byte) {
	t.Helper()
	files := map[string][]byte{}
	var entries []lt.Entry
	for i := range 10 {
		for _, p := range []string{"p", "r"} {
			name := fmt.Sprintf("%s%d", p, i)
			files[name] = lt.Random(name, 150_000)
			entries = append(entries, lt.File(name, files[name]))
		}
	}
	b, err := lt.Estargz(lt.Tar(entries...), estargz.WithChunkSize(64<<10), estargz.WithPrioritizedFiles(prio))
	if err != nil {
		t.Fatal(err)
	}
	return &memBlob{data: b.Data}, digest.Digest(b.TOCDigest), files
}

func TestPrefetch(t *testing.T) {
	prio := []string{"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"}
	tests := []struct {
		name     string
		prio     []string
		requests int64 // made by Prefetch
	}{
		{"landmark: one request", prio, 1},
		{"no.prefetch.landmark: none", nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob, d, files := prioritized(t, tt.prio)
			l := open(t, blob, d)
			blob.reads.Store(0)
			if err := l.Prefetch(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := blob.reads.Load(); got != tt.requests {
				t.Errorf("Prefetch made %d requests, want %d", got, tt.requests)
			}
			s := l.Stats()
			if s.Requests != tt.requests {
				t.Errorf("Stats().Requests = %d, want %d", s.Requests, tt.requests)
			}
			if tt.requests > 0 && (s.Prefetch != "done" || s.FetchedBytes <= 0 || s.FetchedBytes > s.PrefetchBytes) {
				t.Errorf("stats after prefetch: %+v", s)
			}
			// Prioritized files read from the cache; the others fetch.
			blob.reads.Store(0)
			for _, p := range tt.prio {
				if got := readAll(t, l, lookup(t, l, p)); !bytes.Equal(got, files[p]) {
					t.Fatalf("%s differs", p)
				}
			}
			if got := blob.reads.Load(); got != 0 {
				t.Errorf("reading prioritized files made %d requests, want 0", got)
			}
			if got := readAll(t, l, lookup(t, l, "r3")); !bytes.Equal(got, files["r3"]) {
				t.Fatal("r3 differs")
			}
			if got := blob.reads.Load(); got != 1 {
				t.Errorf("reading r3 made %d requests, want 1", got)
			}
			s = l.Stats()
			// r3: one miss fetches its three chunks, two hits follow.
			if s.MemoryMisses != 1 || s.MemoryHits != int64(3*len(tt.prio)+2) {
				t.Errorf("hits %d, misses %d; want %d, 1", s.MemoryHits, s.MemoryMisses, 3*len(tt.prio)+2)
			}
		})
	}
}

// stoppable is a blob that can be made to fail every read, like a registry
// that went away.
type stoppable struct {
	*memBlob
	stopped atomic.Bool
}

func (s *stoppable) ReadAt(p []byte, off int64) (int, error) {
	if s.stopped.Load() {
		return 0, errors.New("registry stopped")
	}
	return s.memBlob.ReadAt(p, off)
}

func TestFetchAllCompletes(t *testing.T) {
	blob, d, files := prioritized(t, []string{"p0", "p1"})
	sb := &stoppable{memBlob: blob}
	l, err := Open(context.Background(), sb, WithTOCDigest(d), WithCache(NewCache(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Prefetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	readAll(t, l, lookup(t, l, "r5")) // something kept on demand already
	if s := l.Stats(); s.Complete {
		t.Fatalf("complete before background fetch: %+v", s)
	}
	blob.reads.Store(0)
	if err := FetchAll(context.Background(), []*Layer{l}, WithRangeSize(1<<20)); err != nil {
		t.Fatal(err)
	}
	s := l.Stats()
	if !s.Complete || s.FetchedBytes != s.TotalBytes || s.Background != "done" {
		t.Fatalf("after FetchAll: %+v", s)
	}
	// 20 files of ~150 KB, three of them kept already: under 3 MiB in
	// ranges of at most 1 MiB, split around the kept ones.
	if r := blob.reads.Load(); r < 3 || r > 6 {
		t.Errorf("FetchAll made %d requests, want 3 to 6", r)
	}
	sb.stopped.Store(true)
	for name, want := range files {
		if got := readAll(t, l, lookup(t, l, name)); !bytes.Equal(got, want) {
			t.Errorf("%s differs", name)
		}
	}
}

func TestFetchAllBandwidth(t *testing.T) {
	blob, d, _ := prioritized(t, nil)
	l := open(t, blob, d, WithCache(NewCache(64<<20)))
	total := l.Stats().TotalBytes
	// Half the layer per second, with a burst of one range: about a second.
	start := time.Now()
	if err := FetchAll(context.Background(), []*Layer{l}, WithBandwidth(total/2), WithRangeSize(256<<10)); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 700*time.Millisecond {
		t.Errorf("fetching %d bytes at %d B/s took %v", total, total/2, el)
	}
	if !l.Stats().Complete {
		t.Error("not complete")
	}
}

// gatedBlob holds every large (background) read until its context is
// cancelled or it is released, and logs what happens.
type gatedBlob struct {
	*memBlob
	bgStarted   chan struct{} // receives when a large read starts
	bgCancelled chan struct{} // closed when a large read is cancelled
	release     chan struct{} // closed to let large reads through
	armed       atomic.Bool   // off: reads pass through

	mu  sync.Mutex // guards log
	log []string
}

func (g *gatedBlob) note(s string) {
	g.mu.Lock()
	g.log = append(g.log, s)
	g.mu.Unlock()
}

func (g *gatedBlob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if !g.armed.Load() {
		return g.memBlob.ReadAt(p, off)
	}
	// On-demand reads bring up to neighbourBytes of the next files along:
	// about 1.2 MB here; the background read is the whole 3 MB layer.
	if len(p) < 2<<20 {
		g.note("demand start")
		defer g.note("demand end")
		// The on-demand read waits for the background read to give way:
		// if it does not, this read would have to wait for its transfer.
		select {
		case <-g.bgCancelled:
		case <-time.After(5 * time.Second):
			return 0, errors.New("background read still running during an on-demand read")
		}
		return g.memBlob.ReadAt(p, off)
	}
	g.note("bg start")
	select {
	case g.bgStarted <- struct{}{}:
	default:
	}
	select {
	case <-ctx.Done():
		g.note("bg cancelled")
		select {
		case <-g.bgCancelled:
		default:
			close(g.bgCancelled)
		}
		return 0, ctx.Err()
	case <-g.release:
		return g.memBlob.ReadAt(p, off)
	}
}

func TestBackgroundYieldsToDemand(t *testing.T) {
	blob, d, files := prioritized(t, nil)
	g := &gatedBlob{memBlob: blob, bgStarted: make(chan struct{}, 1), bgCancelled: make(chan struct{}), release: make(chan struct{})}
	l, err := Open(context.Background(), g, WithTOCDigest(d), WithCache(NewCache(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	g.armed.Store(true)
	done := make(chan error, 1)
	go func() {
		done <- FetchAll(context.Background(), []*Layer{l}, WithRangeSize(64<<20), WithQuiet(0), WithIdle(0))
	}()
	<-g.bgStarted
	// An on-demand read while the background read is on the wire.
	if got := readAll(t, l, lookup(t, l, "p4")); !bytes.Equal(got, files["p4"]) {
		t.Fatal("p4 differs")
	}
	close(g.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	log := slices.Clone(g.log)
	g.mu.Unlock()
	// The background read was abandoned during the on-demand one and none
	// started until it ended.
	at := func(ev string, from int) int {
		if i := slices.Index(log[from:], ev); i >= 0 {
			return from + i
		}
		return len(log)
	}
	end := at("demand end", 0)
	if log[0] != "bg start" || at("bg cancelled", 0) > end || at("bg start", 1) < end || at("bg start", 1) == len(log) {
		t.Errorf("events %q: want a background read, cancelled before the on-demand read ended, then another", log)
	}
	if !l.Stats().Complete {
		t.Errorf("not complete after FetchAll: %+v", l.Stats())
	}
}

// TestBackgroundWaitsForIdle: while the layer is in use (lookups and
// reads of cached files, no fetch), background fetching does not start;
// once use pauses for the idle time, it does.
func TestBackgroundWaitsForIdle(t *testing.T) {
	blob, d, _ := prioritized(t, []string{"p0"})
	l, err := Open(context.Background(), blob, WithTOCDigest(d), WithCache(NewCache(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Prefetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	p0 := lookup(t, l, "p0")
	blob.reads.Store(0)
	const idle = 200 * time.Millisecond
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- FetchAll(context.Background(), []*Layer{l}, WithIdle(idle)) }()
	var stopped time.Time
	for time.Since(start) < 3*idle {
		stopped = time.Now()
		l.Touch()
		readAll(t, l, p0)
		time.Sleep(idle / 10)
	}
	if r := blob.reads.Load(); r != 0 {
		t.Errorf("%d background requests while the layer was in use", r)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if took := time.Since(stopped); took < idle {
		t.Errorf("background fetch finished %v after use stopped, before the %v idle time", took, idle)
	}
	if !l.Stats().Complete {
		t.Errorf("not complete: %+v", l.Stats())
	}
}

func TestRecord(t *testing.T) {
	blob, d, _ := prioritized(t, nil)
	l := open(t, blob, d)
	readAll(t, l, lookup(t, l, "r1")) // before Record: not listed
	l.Record()
	for _, p := range []string{"p3", "r1", "p3", "p0"} {
		readAll(t, l, lookup(t, l, p))
	}
	if got, want := l.Recorded(), []string{"/p3", "/r1", "/p0"}; !slices.Equal(got, want) {
		t.Errorf("Recorded() = %q, want %q", got, want)
	}
}

// stallBlob holds reads of more than 1 MiB until release is closed.
type stallBlob struct {
	*memBlob
	started chan struct{} // receives when a large read starts
	release chan struct{}
}

func (s *stallBlob) ReadAt(p []byte, off int64) (int, error) {
	if len(p) > 1<<20 {
		s.started <- struct{}{}
		<-s.release
	}
	return s.memBlob.ReadAt(p, off)
}

// TestReadDuringPrefetch reads a prioritized file while the prefetch
// request is on the wire: the read waits for it instead of fetching.
func TestReadDuringPrefetch(t *testing.T) {
	blob, d, files := prioritized(t, []string{"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"})
	sb := &stallBlob{memBlob: blob, started: make(chan struct{}, 1), release: make(chan struct{})}
	l, err := Open(context.Background(), sb, WithTOCDigest(d), WithTailSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	blob.reads.Store(0)
	pf := make(chan error, 1)
	go func() { pf <- l.Prefetch(context.Background()) }()
	<-sb.started
	read := make(chan []byte, 1)
	go func() { read <- readAll(t, l, lookup(t, l, "p3")) }()
	select {
	case <-read:
		t.Fatal("the read did not wait for the prefetch")
	case <-time.After(100 * time.Millisecond):
	}
	close(sb.release)
	if got := <-read; !bytes.Equal(got, files["p3"]) {
		t.Error("p3 differs")
	}
	if err := <-pf; err != nil {
		t.Fatal(err)
	}
	if r := blob.reads.Load(); r != 1 {
		t.Errorf("%d requests, want the prefetch's one", r)
	}
}

// TestEarlyPrefetch: with WithEarlyPrefetch the prioritized region is
// requested before Open returns (the request is held open here until
// then), and Prefetch uses it: one request in all, the files right.
func TestEarlyPrefetch(t *testing.T) {
	prio := []string{"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"}
	blob, d, files := prioritized(t, prio)
	sb := &stallBlob{memBlob: blob, started: make(chan struct{}, 1), release: make(chan struct{})}
	l, err := Open(context.Background(), sb, WithTOCDigest(d), WithTailSize(64<<10), WithEarlyPrefetch())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-sb.started:
	case <-time.After(5 * time.Second):
		t.Fatal("no request for the prioritized region during Open")
	}
	reads := blob.reads.Load()
	close(sb.release)
	if err := l.Prefetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := blob.reads.Load(); got != reads+1 {
		t.Errorf("Open and Prefetch made %d region requests, want 1", got-reads)
	}
	if s := l.Stats(); s.Requests != 1 || s.Prefetch != "done" || s.FetchedBytes <= 0 {
		t.Errorf("stats after an early prefetch: %+v", s)
	}
	blob.reads.Store(0)
	for _, p := range prio {
		if got := readAll(t, l, lookup(t, l, p)); !bytes.Equal(got, files[p]) {
			t.Fatalf("%s differs", p)
		}
	}
	if got := blob.reads.Load(); got != 0 {
		t.Errorf("reading prioritized files made %d requests, want 0", got)
	}
}

func TestLandmarkOffset(t *testing.T) {
	tests := []struct {
		name string
		toc  string
		want int64
	}{
		{"landmark", `{"version":1,"entries":[{"name":"a","type":"reg","offset":5},{"name":".prefetch.landmark","type":"reg","size":1,"offset":1234}]}`, 1234},
		{"indented, dot-slash", "{\n\t\"entries\": [\n\t\t{\n\t\t\t\"name\": \"./.prefetch.landmark\",\n\t\t\t\"offset\": 77\n\t\t}\n\t]\n}", 77},
		{"no prefetch landmark", `{"entries":[{"name":".no.prefetch.landmark","type":"reg","offset":99}]}`, 0},
		{"none", `{"entries":[{"name":"a","type":"reg","offset":5}]}`, 0},
		{"in a deeper directory", `{"entries":[{"name":"d/.prefetch.landmark","type":"reg","offset":5}]}`, 0},
		{"in a string value", `{"entries":[{"name":"x","linkName":"y.prefetch.landmark"}]}`, 0},
		{"malformed", `{"entries":[{"name":".prefetch.landmark","offset":"x"}]}`, 0},
		{"unbalanced", `".prefetch.landmark"`, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := landmarkOffset([]byte(tt.toc)); got != tt.want {
				t.Errorf("landmarkOffset = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestEarlyPrefetchTampered: a byte flipped in a prioritized chunk of the
// blob: the early region's bytes fail verification like any others, that
// file's read fails, the other prioritized files read right.
func TestEarlyPrefetchTampered(t *testing.T) {
	prio := []string{"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"}
	blob, d, files := prioritized(t, prio)
	clean := open(t, blob, d)
	victim := lookup(t, clean, "p4").chunks[1]
	// Flip a byte in the middle of p4's second chunk's gzip member.
	blob.data[(victim.blobOff+victim.blobEnd)/2] ^= 0x10
	l, err := Open(context.Background(), blob, WithTOCDigest(d), WithEarlyPrefetch())
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Prefetch(context.Background()); err == nil {
		t.Error("Prefetch of a tampered region reported nothing")
	}
	for _, p := range prio {
		n := lookup(t, l, p)
		out := make([]byte, n.Size)
		_, err := l.ReadAt(context.Background(), n, out, 0)
		if p == "p4" {
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("read of the tampered file: %v, want ErrCorrupt", err)
			}
			continue
		}
		if err != nil || !bytes.Equal(out, files[p]) {
			t.Errorf("%s: %v, right bytes %v", p, err, bytes.Equal(out, files[p]))
		}
	}
}

// streamBlob is a memBlob that streams ranges, as the fetcher does.
type streamBlob struct{ *memBlob }

func (s streamBlob) OpenRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	s.reads.Add(1)
	return io.NopCloser(bytes.NewReader(s.data[off : off+n])), nil
}

// TestPrefetchSegments: a prioritized region larger than a segment comes
// in one streamed request, is decoded segment by segment, and every
// prioritized file then reads without a request.
func TestPrefetchSegments(t *testing.T) {
	files := map[string][]byte{}
	var entries []lt.Entry
	var prio []string
	for i := range 3 {
		name := fmt.Sprintf("p%d", i)
		files[name] = lt.Random(name, 8<<20)
		entries = append(entries, lt.File(name, files[name]))
		prio = append(prio, name)
	}
	entries = append(entries, lt.File("rest", lt.Random("rest", 100)))
	b, err := lt.Estargz(lt.Tar(entries...), estargz.WithPrioritizedFiles(prio))
	if err != nil {
		t.Fatal(err)
	}
	blob := streamBlob{&memBlob{data: b.Data}}
	l, err := Open(context.Background(), blob, WithTOCDigest(digest.Digest(b.TOCDigest)), WithCache(NewCache(256<<20)))
	if err != nil {
		t.Fatal(err)
	}
	if l.PrefetchBytes() <= prefetchSegment {
		t.Fatalf("prioritized region of %d bytes fits one segment of %d", l.PrefetchBytes(), prefetchSegment)
	}
	blob.reads.Store(0)
	if err := l.Prefetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := blob.reads.Load(); got != 1 {
		t.Errorf("Prefetch made %d requests, want 1", got)
	}
	for _, p := range prio {
		if got := readAll(t, l, lookup(t, l, p)); !bytes.Equal(got, files[p]) {
			t.Fatalf("%s differs", p)
		}
	}
	if got := blob.reads.Load(); got != 1 {
		t.Errorf("reading prioritized files made %d requests, want none", got-1)
	}
}
