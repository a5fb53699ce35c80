package reader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/gzip"
	"golang.org/x/sync/errgroup"
)

// ErrCorrupt marks data that failed verification: the blob's bytes are not
// what the TOC promised. Trying again will not help.
var ErrCorrupt = errors.New("corrupt chunk")

// ReadAt reads a regular file's bytes at off into p, fetching, verifying and
// caching the chunks it needs. It returns io.EOF when p reaches past the end.
func (l *Layer) ReadAt(ctx context.Context, n *Node, p []byte, off int64) (int, error) {
	if !n.Mode.IsRegular() {
		return 0, fmt.Errorf("read %s %s: not a regular file", l.name, n.Path())
	}
	if off < 0 {
		return 0, fmt.Errorf("read %s %s: negative offset", l.name, n.Path())
	}
	if off >= n.Size {
		return 0, io.EOF
	}
	l.noteRead(n, off, int64(len(p)))
	l.note(n)
	i := sort.Search(len(n.chunks), func(i int) bool { return n.chunks[i].off+n.chunks[i].size > off })
	done := 0
	for ; i < len(n.chunks) && done < len(p); i++ {
		c := &n.chunks[i]
		data, err := l.chunk(ctx, n, i)
		if err != nil {
			return done, err
		}
		done += copy(p[done:], data[off+int64(done)-c.off:])
	}
	if done < len(p) {
		return done, io.EOF
	}
	return done, nil
}

// Fetch planning. On a miss, the chunk asked for and the file's following
// chunks that are neither cached nor in flight come in one request of at
// most runBytes compressed bytes, with the chunks of the files stored
// after it up to neighbourBytes. A gap of at most maxGap (chunks already
// cached or being fetched) is fetched along, being cheaper than a round
// trip; a larger one starts a new range of the same multi-range request,
// up to maxRanges.
const (
	runBytes       = 4 << 20
	maxGap         = 64 << 10
	maxRanges      = 8
	neighbourBytes = 1 << 20
	// lookBytes bounds how far past the chunk asked for a plan looks.
	lookBytes = 2*runBytes + neighbourBytes
)

// fetchTimeout bounds one chunk fetch, retries included; the blob's own
// deadline (the fetcher's --fetch-timeout) is usually shorter.
const fetchTimeout = 2 * time.Minute

// failureMemory is how long a failed fetch answers for its chunks without
// a new request, so a storm of retried reads does not hammer a registry
// that is down.
const failureMemory = 500 * time.Millisecond

// fetchTable is a layer's chunk fetches in flight, recent failures and
// sequential-read state.
type fetchTable struct {
	mu       sync.Mutex          // guards inflight, failed and seq
	inflight map[string]*call    // by chunk key
	failed   map[string]failure  // by chunk key
	seq      map[*Node]*seqState // by file being read

	ahead      atomic.Int64 // compressed bytes of read-ahead fetches in flight
	aheadPlans atomic.Int64 // read-ahead fetches in flight
	loading    atomic.Int64 // bytes of read-ahead store loads in flight
}

// call is one chunk's fetch; done is closed when data or err is set.
type call struct {
	done  chan struct{}
	data  []byte
	err   error
	ahead bool // started by read-ahead, not by a read
}

type failure struct {
	err   error
	until time.Time
}

// plan is one fetch: chunks read as ranges of the blob.
type plan struct {
	chunks []*chunk // in blob order
	owners []*Node  // the file of each chunk
	calls  []*call  // one per chunk
	ranges []span   // blob ranges to read, ascending, covering the chunks
	bytes  int64    // compressed bytes to read
	ahead  bool
}

type span struct{ off, end int64 }

func (l *Layer) key(c *chunk) string {
	return l.name + "@" + strconv.FormatInt(c.blobOff, 10) + "+" + strconv.FormatInt(c.inner, 10)
}

// chunk returns the decompressed, verified bytes of n.chunks[i].
func (l *Layer) chunk(ctx context.Context, n *Node, i int) ([]byte, error) {
	c := &n.chunks[i]
	key := l.key(c)
	if b, ok := l.cache.getMemory(key); ok && int64(len(b)) == c.size {
		l.acct.memHits.Add(1)
		return b, nil
	}
	l.acct.memMisses.Add(1)
	if b, ok, looked := l.cache.getStore(key); looked {
		if ok && int64(len(b)) == c.size {
			l.acct.diskHits.Add(1)
			return b, nil
		}
		l.acct.diskMisses.Add(1)
	}
	defer l.demand.begin()() // background fetching pauses meanwhile
	for {
		// The store was looked in above; what a fetch brings is in memory.
		if b, ok := l.cache.getMemory(key); ok && int64(len(b)) == c.size {
			return b, nil
		}
		t := &l.fetches
		t.mu.Lock()
		cl := t.inflight[key]
		if cl == nil {
			// Fetches finish by caching, then leaving the table: a
			// chunk no longer in flight may have just been cached.
			if b, ok := l.cache.getMemory(key); ok && int64(len(b)) == c.size {
				t.mu.Unlock()
				return b, nil
			}
			if f, ok := t.failed[key]; ok && time.Now().Before(f.until) {
				t.mu.Unlock()
				return nil, fmt.Errorf("read %s %s at %d: %w", l.name, n.Path(), c.off, f.err)
			}
			p := l.planLocked(n, i, n.Size, runBytes, false)
			cl = p.calls[0]
			t.mu.Unlock()
			go l.run(p)
		} else {
			t.mu.Unlock()
		}
		select {
		case <-cl.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("read %s %s at %d: %w", l.name, n.Path(), c.off, ctx.Err())
		}
		if cl.err != nil && cl.ahead && !errors.Is(cl.err, ErrCorrupt) {
			// A read-ahead that failed (it may have queued too long
			// behind others) is no verdict on this read: fetch anew.
			l.fetches.mu.Lock()
			delete(l.fetches.failed, key)
			l.fetches.mu.Unlock()
			continue
		}
		if cl.err != nil {
			return nil, fmt.Errorf("read %s %s at %d: %w", l.name, n.Path(), c.off, cl.err)
		}
		return cl.data, nil
	}
}

// planLocked plans a fetch starting at chunk i of n and registers its
// calls as in flight. It walks the layer's chunks in blob order, so the
// files stored after n (the next files of a directory, usually) come along
// in the same request, up to neighbourBytes of them. A read's plan always
// holds chunk i; a read-ahead's skips leading chunks that are cached or in
// flight and may be empty. It looks at the chunks of n before file offset
// end and at no chunk more than lookBytes past chunk i in the blob: every
// chunk looked at may cost a stat of the disk cache. The caller holds
// l.fetches.mu.
func (l *Layer) planLocked(n *Node, i int, end, limit int64, ahead bool) *plan {
	t := &l.fetches
	if t.inflight == nil {
		t.inflight = map[string]*call{}
		t.failed = map[string]failure{}
	}
	// The layer's chunks in blob order (stats.go). Only their fixed
	// fields c and n are read here: kept changes under another lock.
	order := l.index()
	c0 := &n.chunks[i]
	pos := sort.Search(len(order), func(k int) bool {
		c := order[k].c
		return c.blobOff > c0.blobOff || (c.blobOff == c0.blobOff && c.inner >= c0.inner)
	})
	if pos == len(order) || order[pos].c.blobOff != c0.blobOff || order[pos].c.inner != c0.inner {
		order, pos = []unit{{c: c0, n: n}}, 0 // not in the index (cannot happen): this chunk alone
	}
	p := &plan{ahead: ahead}
	var foreign int64 // bytes of other files planned
	now := time.Now()
	for k := pos; k < len(order); k++ {
		c, owner := order[k].c, order[k].n
		if k == pos {
			// The index keeps one of chunks sharing their bytes: plan
			// the one asked for, as n's.
			c, owner = c0, n
		}
		if k > pos && (c.blobOff-c0.blobOff > lookBytes || (owner == n && c.off >= end)) {
			return p
		}
		key := l.key(c)
		if k > pos || ahead {
			covered := t.inflight[key] != nil
			if f, ok := t.failed[key]; ok && now.Before(f.until) {
				covered = true
			}
			covered = covered || l.cache.has(key)
			if covered {
				if owner != n && len(p.chunks) == 0 {
					return p // read-ahead found nothing left of its file
				}
				continue
			}
		}
		size := c.blobEnd - c.blobOff
		if owner != n {
			if foreign+size > neighbourBytes {
				return p
			}
		}
		if r := len(p.ranges); r > 0 {
			last := &p.ranges[r-1]
			gap := c.blobOff - last.end
			switch {
			case gap <= maxGap:
				grow := max(c.blobEnd, last.end) - last.end
				if p.bytes+grow > limit {
					return p
				}
				p.bytes += grow
				last.end += grow
			case r < maxRanges && p.bytes+size <= limit:
				p.ranges = append(p.ranges, span{c.blobOff, c.blobEnd})
				p.bytes += size
			default:
				return p
			}
		} else {
			p.ranges = append(p.ranges, span{c.blobOff, c.blobEnd})
			p.bytes = size
		}
		if owner != n {
			foreign += size
		}
		cl := &call{done: make(chan struct{}), ahead: ahead}
		t.inflight[key] = cl
		delete(t.failed, key)
		p.chunks = append(p.chunks, c)
		p.owners = append(p.owners, owner)
		p.calls = append(p.calls, cl)
	}
	return p
}

// rangesReader is implemented by blobs that read several ranges in one go
// (the fetcher's multi-range requests).
type rangesReader interface {
	ReadRangesAt(ctx context.Context, offs []int64, bufs [][]byte) error
}

// run fetches a plan's ranges, decodes and caches its chunks and completes
// their calls. It does not depend on any reader's context: other readers
// may be waiting on it.
func (l *Layer) run(p *plan) {
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	if _, ok := l.blob.(rangeStreamer); ok && len(p.ranges) == 1 && len(p.chunks) > 1 {
		l.runStream(ctx, p)
		return
	}
	bufs := make([][]byte, len(p.ranges))
	offs := make([]int64, len(p.ranges))
	for k, r := range p.ranges {
		bufs[k] = make([]byte, r.end-r.off)
		offs[k] = r.off
	}
	var err error
	switch rr, ok := l.blob.(rangesReader); {
	case len(p.ranges) == 1:
		err = readFull(ctx, l.blob, bufs[0], offs[0])
	case ok:
		err = rr.ReadRangesAt(ctx, offs, bufs)
	default:
		var g errgroup.Group
		for k := range p.ranges {
			g.Go(func() error { return readFull(ctx, l.blob, bufs[k], offs[k]) })
		}
		err = g.Wait()
	}
	if err != nil {
		first, last := p.ranges[0], p.ranges[len(p.ranges)-1]
		err = fmt.Errorf("fetch blob bytes %d-%d: %w", first.off, last.end-1, err)
	} else {
		l.counted(int(p.bytes))
	}
	k := 0
	for x, c := range p.chunks {
		cl := p.calls[x]
		if err != nil {
			cl.err = err
			continue
		}
		for p.ranges[k].end < c.blobEnd {
			k++
		}
		r := p.ranges[k]
		cl.data, cl.err = decode(c, bufs[k][c.blobOff-r.off:c.blobEnd-r.off])
		if cl.err == nil {
			l.keep(c, cl.data)
		}
	}
	l.finish(p, 0, len(p.chunks))
}

// rangeStreamer is implemented by blobs that stream a range as it arrives
// (the fetcher's OpenRange).
type rangeStreamer interface {
	OpenRange(ctx context.Context, off, n int64) (io.ReadCloser, error)
}

// runStream is run for a plan of one range from a blob that streams: each
// chunk is decoded, kept and handed to its readers as soon as its bytes
// are in, rather than when the whole range is. A sequential reader thus
// follows the download the way it would follow one GET of the blob. Only
// the compressed bytes of the chunk being decoded are held, in one buffer
// reused for the plan's chunks: a fresh buffer per range costs a page
// fault per 4 KiB written to it, about a tenth of a cold read's CPU.
func (l *Layer) runStream(ctx context.Context, p *plan) {
	r := p.ranges[0]
	rc, err := l.blob.(rangeStreamer).OpenRange(ctx, r.off, r.end-r.off)
	var w window
	if err == nil {
		defer rc.Close()
		w = window{r: rc, off: r.off, pos: r.off}
	}
	for x, c := range p.chunks {
		cl := p.calls[x]
		var comp []byte
		if err == nil {
			comp, err = w.bytes(c.blobOff, c.blobEnd)
		}
		if err != nil {
			cl.err = fmt.Errorf("fetch blob bytes %d-%d: %w", r.off, r.end-1, err)
		} else {
			cl.data, cl.err = decode(c, comp)
			if cl.err == nil {
				l.keep(c, cl.data)
			}
		}
		l.finish(p, x, x+1)
	}
	if err == nil {
		l.counted(int(p.bytes))
	}
}

// window reads a stream of blob bytes front to back and holds the bytes of
// one chunk, or one prefetch segment, at a time, in one buffer reused.
// Requests come in blob order and may share bytes (several chunks of one
// gzip member); the bytes between two are skipped.
type window struct {
	r   io.Reader
	buf []byte // blob bytes [off, pos)
	off int64
	pos int64 // blob offset of the next byte r gives
}

// bytes returns blob bytes [from, to), valid until the next call.
func (w *window) bytes(from, to int64) ([]byte, error) {
	buf, fill, err := w.segment(from, to)
	if err != nil {
		return nil, err
	}
	return buf, fill(to - from)
}

// segment returns a buffer for blob bytes [from, to) and fill(n), which
// returns once buf[:n] holds them, so that a caller can use the first
// bytes while the rest arrive. Both are valid until the next call.
func (w *window) segment(from, to int64) (buf []byte, fill func(n int64) error, err error) {
	if from < w.off || to < from {
		return nil, nil, fmt.Errorf("chunk at blob offset %d is out of order (window at %d)", from, w.off)
	}
	if to <= w.pos {
		return w.buf[from-w.off : to-w.off], func(int64) error { return nil }, nil
	}
	keep := 0
	if from < w.pos {
		keep = copy(w.buf, w.buf[from-w.off:w.pos-w.off])
	} else if _, err := io.CopyN(io.Discard, w.r, from-w.pos); err != nil {
		return nil, nil, err
	}
	if need := int(to - from); cap(w.buf) < need {
		b := make([]byte, need)
		copy(b, w.buf[:keep])
		w.buf = b
	}
	w.buf = w.buf[:to-from]
	w.off, w.pos = from, from+int64(keep)
	return w.buf, func(n int64) error {
		if got := w.pos - from; got < n {
			k, err := io.ReadFull(w.r, w.buf[got:n])
			w.pos += int64(k)
			return err
		}
		return nil
	}, nil
}

// finish takes the calls [from, to) of p, their data or error set, out of
// the fetch table, remembering failures, and wakes their readers.
func (l *Layer) finish(p *plan, from, to int) {
	t := &l.fetches
	t.mu.Lock()
	until := time.Now().Add(failureMemory)
	for x := from; x < to; x++ {
		c := p.chunks[x]
		key := l.key(c)
		delete(t.inflight, key)
		if cl := p.calls[x]; cl.err != nil && !cl.ahead {
			t.failed[key] = failure{err: cl.err, until: until}
		}
	}
	if len(t.failed) > 4096 { // forget expired failures now and then
		now := time.Now()
		for key, f := range t.failed {
			if now.After(f.until) {
				delete(t.failed, key)
			}
		}
	}
	t.mu.Unlock()
	for _, cl := range p.calls[from:to] {
		close(cl.done)
	}
}

// decode decompresses chunk c from its compressed bytes and verifies it.
func decode(c *chunk, comp []byte) ([]byte, error) {
	if c.zstd {
		return decodeZstd(c, comp)
	}
	// Deflate cannot expand data more than 1032 times: a TOC declaring more
	// is lying, and believing it would allocate for nothing.
	if c.inner+c.size > int64(len(comp))*1032+1024 {
		return nil, fmt.Errorf("%w: chunk at blob offset %d declares %d bytes, more than %d compressed bytes can hold", ErrCorrupt, c.blobOff, c.inner+c.size, len(comp))
	}
	if data, ok := storedChunk(comp, c.inner, c.size); ok {
		return data, verifyDigest(c, data)
	}
	zr, err := gzip.NewReader(bytes.NewReader(comp))
	if err != nil {
		return nil, fmt.Errorf("%w: blob bytes %d-%d are not gzip: %v", ErrCorrupt, c.blobOff, c.blobEnd-1, err)
	}
	defer zr.Close()
	return readChunk(c, zr, "gzip member", int64(len(comp)))
}

// readChunk reads chunk c from r, the decompressed unit (gzip member, zstd
// frame) of compLen compressed bytes holding it, and verifies it. Memory
// follows what r yields, not what the TOC declares: a hostile TOC may
// declare 64 MiB for a chunk whose data holds a few bytes. The first
// buffer holds what a 16:1 ratio would give, and it grows by doubling.
func readChunk(c *chunk, r io.Reader, unit string, compLen int64) ([]byte, error) {
	if _, err := io.CopyN(io.Discard, r, c.inner); err != nil {
		return nil, fmt.Errorf("%w: %s at %d ends before inner offset %d: %v", ErrCorrupt, unit, c.blobOff, c.inner, err)
	}
	data := newBuffer(min(c.size, max(1<<20, 16*compLen)))
	for got := 0; ; {
		k, err := io.ReadFull(r, data[got:])
		got += k
		if err != nil {
			return nil, fmt.Errorf("%w: %s at %d holds less than the %d bytes the TOC declares: %v", ErrCorrupt, unit, c.blobOff, c.size, err)
		}
		if int64(got) == c.size {
			break
		}
		more := newBuffer(min(c.size, 2*int64(len(data))))
		copy(more, data)
		data = more
	}
	return data, verifyDigest(c, data)
}

// verifyDigest checks data, chunk c's bytes, against c's digest, if any.
func verifyDigest(c *chunk, data []byte) error {
	if c.digest == "" {
		return nil
	}
	v := c.digest.Verifier()
	v.Write(data)
	if !v.Verified() {
		return fmt.Errorf("%w: chunk at blob offset %d does not match its digest %s", ErrCorrupt, c.blobOff, c.digest)
	}
	return nil
}
