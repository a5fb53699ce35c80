package reader

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// Prefetch fetches the layer's prioritized region, everything before its
// ".prefetch.landmark", in one request, and keeps every chunk in it that
// verifies, as an on-demand read would. A layer without the landmark (or
// with ".no.prefetch.landmark") has nothing to prefetch. A chunk that fails
// verification is skipped: its on-demand read reports it.
func (l *Layer) Prefetch(ctx context.Context) error {
	if l.prefetch <= 0 {
		return nil
	}
	units := l.index()
	var todo []int
	start, end := int64(-1), int64(0)
	for i, u := range units {
		if u.c.blobOff >= l.prefetch {
			break
		}
		if l.isKept(i) || l.cached(u.c) {
			continue // from the disk cache of an earlier mount
		}
		if start < 0 {
			start = u.c.blobOff
		}
		end = max(end, min(u.c.blobEnd, l.prefetch))
		todo = append(todo, i)
	}
	if len(todo) == 0 {
		l.DropEarlyPrefetch()
		l.acct.prefetch.Store("done")
		return nil
	}
	l.acct.prefetch.Store("running")
	// The disk-cache writes wait until the mount has been idle a while:
	// the program it was started for runs first.
	resume := l.cache.pauseWrites()
	defer func() {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), maxWritePause)
			defer cancel()
			l.demand.WaitIdle(ctx, writeIdle)
			resume()
		}()
	}()
	// Reads of these chunks meanwhile wait for this fetch rather than
	// fetching them again.
	calls := l.claim(units, todo)
	// Chunks are decoded, on every core, as their bytes arrive: the mount
	// waits for the prefetch, and decoding is most of its CPU time. They
	// come in segments of at most prefetchSegment compressed bytes, each
	// decoded and handed over before the next is read, so memory holds one
	// segment, not the region (which may be gigabytes).
	var (
		src segmentSource
		err error
	)
	if r := l.takeEarly(); r != nil && r.off <= start && end <= r.off+int64(len(r.buf)) {
		// Requested while the TOC was parsed (early.go).
		src = &earlySource{r: r}
		stop := context.AfterFunc(ctx, r.cancel)
		defer stop()
	} else {
		if r != nil {
			r.cancel()
		}
		src, err = l.streamSource(ctx, start, end)
	}
	fail := func(err error) error {
		return fmt.Errorf("prefetch %s: blob bytes %d-%d: %w", l.name, start, end-1, err)
	}
	if err != nil {
		err = fail(err)
		for _, cl := range calls {
			if cl != nil {
				cl.err = err
			}
		}
		l.settle(units, todo, calls)
		l.acct.prefetch.Store("failed")
		return err
	}
	var bad atomic.Int64
	for from := 0; from < len(todo); {
		// The segment: todo[from:to], blob bytes [segOff, segEnd).
		segOff := units[todo[from]].c.blobOff
		segEnd, to := segOff, from
		for ; to < len(todo); to++ {
			c := units[todo[to]].c
			if to > from && c.blobEnd-segOff > prefetchSegment {
				break
			}
			segEnd = max(segEnd, min(c.blobEnd, end))
		}
		var seg []byte
		var fill func(n int64) error // buffers seg[:n]
		if err == nil {
			if seg, fill, err = src.segment(segOff, segEnd); err != nil {
				err = fail(err)
			}
		}
		var g errgroup.Group
		g.SetLimit(runtime.GOMAXPROCS(0))
		for x := from; x < to; x++ {
			c, cl := units[todo[x]].c, calls[x]
			switch {
			case cl == nil:
				continue
			case c.blobEnd > end:
				cl.err = fmt.Errorf("prefetch %s: chunk at %d outside the prioritized region", l.name, c.blobOff)
				continue
			}
			if err == nil {
				// Each chunk is decoded as soon as its bytes are in.
				if err = fill(c.blobEnd - segOff); err != nil {
					err = fail(err)
				}
			}
			if err != nil {
				cl.err = err
				continue
			}
			g.Go(func() error {
				cl.data, cl.err = decode(c, seg[c.blobOff-segOff:c.blobEnd-segOff])
				if cl.err != nil {
					bad.Add(1)
					l.logger.Warn("prefetch: bad chunk", "layer", l.name, "offset", c.blobOff, "err", cl.err)
					return nil
				}
				l.keep(c, cl.data)
				return nil
			})
		}
		g.Wait()
		l.settle(units, todo[from:to], calls[from:to])
		from = to
	}
	src.close()
	if err == nil {
		l.counted(int(end - start))
	}
	if err != nil {
		l.acct.prefetch.Store("failed")
		return err
	}
	l.acct.prefetch.Store("done")
	if n := bad.Load(); n > 0 {
		return fmt.Errorf("prefetch %s: %d chunks did not verify", l.name, n)
	}
	return nil
}

// prefetchSegment bounds the compressed bytes of a prefetch held at once.
const prefetchSegment = 16 << 20

// segmentSource gives a prefetch its blob bytes a segment at a time, in
// ascending order: segment returns a buffer for [from, to) and fill(n),
// which returns once buf[:n] holds the bytes. A segment's buffer is valid
// until the next segment is asked for.
type segmentSource interface {
	segment(from, to int64) (buf []byte, fill func(n int64) error, err error)
	close()
}

// earlySource serves segments from the region fetched early.
type earlySource struct{ r *region }

func (e *earlySource) segment(from, to int64) ([]byte, func(int64) error, error) {
	r := e.r
	return r.buf[from-r.off : to-r.off], func(n int64) error { return r.fill(from - r.off + n) }, nil
}

func (e *earlySource) close() { e.r.cancel() }

// streamSource reads blob bytes [start, end) in one request, front to
// back, through a window. A blob that does not stream (tests) is read a
// segment at a time.
func (l *Layer) streamSource(ctx context.Context, start, end int64) (segmentSource, error) {
	rs, ok := l.blob.(rangeStreamer)
	if !ok {
		return &segmentReads{ctx: ctx, b: l.blob}, nil
	}
	rc, err := rs.OpenRange(ctx, start, end-start)
	if err != nil {
		return nil, err
	}
	return &streamed{window{r: rc, off: start, pos: start}, rc}, nil
}

// streamed serves segments from one streamed request.
type streamed struct {
	window
	rc io.Closer
}

func (s *streamed) close() { s.rc.Close() }

// segmentReads reads each segment with a request of its own.
type segmentReads struct {
	ctx context.Context
	b   Blob
}

func (s *segmentReads) segment(from, to int64) ([]byte, func(int64) error, error) {
	buf := make([]byte, to-from)
	err := readFull(s.ctx, s.b, buf, from)
	return buf, func(int64) error { return nil }, err
}

func (s *segmentReads) close() {}

// After a prefetch, disk-cache writes wait for writeIdle without use of
// the mount, at most maxWritePause.
const (
	writeIdle     = 200 * time.Millisecond
	maxWritePause = 5 * time.Second
)

// claim registers a call in the layer's fetch table for each of the units
// idx that is not in flight already, so reads wait for it. Calls are
// read-ahead calls: a reader whose call fails for any reason but
// corruption fetches the chunk itself. The result has nil for chunks
// someone else is fetching.
func (l *Layer) claim(units []unit, idx []int) []*call {
	t := &l.fetches
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.inflight == nil {
		t.inflight = map[string]*call{}
		t.failed = map[string]failure{}
	}
	calls := make([]*call, len(idx))
	for x, i := range idx {
		key := l.key(units[i].c)
		if t.inflight[key] != nil {
			continue
		}
		cl := &call{done: make(chan struct{}), ahead: true}
		t.inflight[key] = cl
		calls[x] = cl
	}
	return calls
}

// settle takes claimed calls, their data or error set, out of the fetch
// table and wakes their readers.
func (l *Layer) settle(units []unit, idx []int, calls []*call) {
	t := &l.fetches
	t.mu.Lock()
	for x, i := range idx {
		if calls[x] != nil {
			delete(t.inflight, l.key(units[i].c))
		}
	}
	t.mu.Unlock()
	for _, cl := range calls {
		if cl != nil {
			close(cl.done)
		}
	}
}
