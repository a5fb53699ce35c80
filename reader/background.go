package reader

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// Demand counts the on-demand fetches in flight in the layers sharing it,
// so background fetching can get out of their way. Share one Demand
// between all layers of a mount (WithDemand); the default is one per layer.
//
// It also notes when the layers were last used at all (Touch), so that
// background fetching starts only once the workload pauses: a program
// starting up reads mostly cached files and makes no fetch, but it needs
// the CPU that decoding background chunks would take.
type Demand struct {
	mu   sync.Mutex    // guards n, idle, busy and last
	n    int           // on-demand fetches in flight
	idle chan struct{} // closed while n == 0
	busy chan struct{} // closed while n > 0
	last time.Time     // when n last dropped to 0

	used atomic.Int64 // when the layers were last used, Unix nanoseconds
}

// NewDemand returns a Demand with nothing in flight, used now.
func NewDemand() *Demand {
	idle := make(chan struct{})
	close(idle)
	d := &Demand{idle: idle, busy: make(chan struct{})}
	d.Touch()
	return d
}

// Touch notes that the layers are being used (a lookup, an open, a read).
func (d *Demand) Touch() { d.used.Store(time.Now().UnixNano()) }

// sinceUsed is how long ago the layers were last used.
func (d *Demand) sinceUsed() time.Duration {
	return time.Duration(time.Now().UnixNano() - d.used.Load())
}

// WithDemand shares d between layers. The default is a Demand per layer.
func WithDemand(d *Demand) Option { return func(o *options) { o.demand = d } }

// Touch notes that the layer is being used (see Demand.Touch); the mount
// calls it for every request it serves.
func (l *Layer) Touch() { l.demand.Touch() }

// begin notes an on-demand fetch; call the result when it is over.
func (d *Demand) begin() func() {
	d.mu.Lock()
	d.n++
	if d.n == 1 {
		close(d.busy)
		d.idle = make(chan struct{})
	}
	d.mu.Unlock()
	return func() {
		d.mu.Lock()
		d.n--
		if d.n == 0 {
			close(d.idle)
			d.busy = make(chan struct{})
			d.last = time.Now()
		}
		d.mu.Unlock()
	}
}

// WaitIdle waits until the layers sharing d have had no on-demand fetch in
// flight and no use (Touch) for idle, or ctx ends.
func (d *Demand) WaitIdle(ctx context.Context, idle time.Duration) error {
	_, err := d.quiet(ctx, idle, idle)
	return err
}

// quiet waits until no on-demand fetch has been in flight for q and the
// layers have not been used for idle, and returns a channel that is closed
// when the next on-demand fetch starts.
func (d *Demand) quiet(ctx context.Context, q, idle time.Duration) (<-chan struct{}, error) {
	for {
		d.mu.Lock()
		if d.n > 0 {
			idle := d.idle
			d.mu.Unlock()
			select {
			case <-idle:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		busy := d.busy
		left := max(q-time.Since(d.last), idle-d.sinceUsed())
		d.mu.Unlock()
		if left <= 0 {
			return busy, nil
		}
		t := time.NewTimer(left)
		select {
		case <-t.C:
		case <-busy:
			t.Stop()
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
}

// BackgroundOption configures FetchAll.
type BackgroundOption func(*bgOptions)

type bgOptions struct {
	bandwidth int64
	rangeSize int64
	quiet     time.Duration
	idle      time.Duration
	parallel  int
}

// WithBandwidth caps background fetching at bytesPerSec, averaged over one
// range. The default, 0, is no cap.
func WithBandwidth(bytesPerSec int64) BackgroundOption {
	return func(o *bgOptions) { o.bandwidth = bytesPerSec }
}

// WithRangeSize sets the most compressed bytes one background request
// asks for. The default is 4 MiB.
func WithRangeSize(n int64) BackgroundOption { return func(o *bgOptions) { o.rangeSize = n } }

// WithParallel sets how many background requests may be in flight at
// once, so one range's round trip overlaps another's transfer. The
// default is 2.
func WithParallel(n int) BackgroundOption { return func(o *bgOptions) { o.parallel = max(n, 1) } }

// WithQuiet sets how long no on-demand fetch must have been in flight
// before background fetching (re)starts. The default is 20 ms.
func WithQuiet(d time.Duration) BackgroundOption { return func(o *bgOptions) { o.quiet = d } }

// WithIdle sets how long the layers must not have been used at all (see
// Demand.Touch) before a background request starts. The default is 500 ms:
// background fetching waits while a program starts up or works through
// files, and runs in its pauses.
func WithIdle(d time.Duration) BackgroundOption { return func(o *bgOptions) { o.idle = d } }

// errPreempted is a background read cut short by an on-demand fetch.
var errPreempted = errors.New("preempted by an on-demand read")

// FetchAll fetches every chunk of the layers (in order) that was never
// kept, in ranges of up to the range size, keeping each verified chunk as
// an on-demand read would. It is low priority: it waits while on-demand
// fetches are in flight and abandons its request the moment one starts,
// so an on-demand read waits for at most what is already on the wire.
// It returns when every layer is complete, ctx is done, or a layer fails.
func FetchAll(ctx context.Context, layers []*Layer, opts ...BackgroundOption) error {
	o := bgOptions{rangeSize: 4 << 20, quiet: 20 * time.Millisecond, idle: 500 * time.Millisecond, parallel: 2}
	for _, opt := range opts {
		opt(&o)
	}
	var tb *bucket
	if o.bandwidth > 0 {
		// A range must fit into the bucket: at most one second's worth.
		o.rangeSize = max(min(o.rangeSize, o.bandwidth), 1)
		tb = newBucket(o.bandwidth, o.rangeSize)
	}
	for _, l := range layers {
		l.acct.background.Store("waiting")
	}
	var errs []error
	for _, l := range layers {
		if err := l.fetchRest(ctx, o, tb); err != nil {
			if ctx.Err() != nil {
				l.acct.background.Store("stopped")
				return ctx.Err()
			}
			l.acct.background.Store("failed")
			l.logger.Warn("background fetch failed", "layer", l.name, "err", err)
			errs = append(errs, fmt.Errorf("background fetch of %s: %w", l.name, err))
			continue
		}
		l.acct.background.Store("done")
	}
	return errors.Join(errs...)
}

// fetchRest fetches the chunks of l not kept yet, up to o.parallel ranges
// at a time.
func (l *Layer) fetchRest(ctx context.Context, o bgOptions, tb *bucket) error {
	units := l.index()
	// Chunks in the disk cache from an earlier mount need no fetching:
	// they are local, so they count as kept.
	have := func(i int) bool {
		if l.isKept(i) {
			return true
		}
		if l.cache.has(l.key(units[i].c)) {
			l.mark(units[i].c)
			return true
		}
		return false
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(o.parallel)
	for i := 0; i < len(units); {
		if have(i) {
			i++
			continue
		}
		// A run of chunks not kept, contiguous in the blob.
		start, end := units[i].c.blobOff, units[i].c.blobEnd
		j := i + 1
		for ; j < len(units); j++ {
			c := units[j].c
			if c.blobOff > end || max(end, c.blobEnd)-start > o.rangeSize || have(j) {
				break
			}
			end = max(end, c.blobEnd)
		}
		first, last := i, j
		g.Go(func() error { return l.fetchRange(gctx, o, tb, first, last, start, end) })
		i = j
	}
	return g.Wait()
}

// fetchRange fetches blob bytes [start, end) and keeps units [i, j) from
// them, starting over whenever an on-demand fetch preempts it.
func (l *Layer) fetchRange(ctx context.Context, o bgOptions, tb *bucket, i, j int, start, end int64) error {
	units := l.index()
	for failures := 0; ; {
		busy, err := l.demand.quiet(ctx, o.quiet, o.idle)
		if err != nil {
			return err
		}
		if tb != nil {
			if err := tb.wait(ctx, end-start); err != nil {
				return err
			}
		}
		l.acct.background.Store("running")
		comp, err := l.fetchPreemptible(ctx, busy, start, end)
		if errors.Is(err, errPreempted) {
			l.acct.background.Store("paused")
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if failures++; failures > 5 {
				return err
			}
			l.logger.Debug("background fetch", "layer", l.name, "err", err)
			continue
		}
		for k := i; k < j; k++ {
			c := units[k].c
			if l.isKept(k) {
				continue
			}
			// Decoding takes CPU an on-demand read may need: wait for it.
			if _, err := l.demand.quiet(ctx, 0, 0); err != nil {
				return err
			}
			data, err := decode(c, comp[c.blobOff-start:c.blobEnd-start])
			if err != nil {
				// The on-demand read of that chunk will report it.
				l.logger.Warn("background fetch: bad chunk", "layer", l.name, "offset", c.blobOff, "err", err)
				continue
			}
			l.keep(c, data)
		}
		return nil
	}
}

// fetchPreemptible reads blob bytes [start, end), giving up with
// errPreempted as soon as busy is closed.
func (l *Layer) fetchPreemptible(ctx context.Context, busy <-chan struct{}, start, end int64) ([]byte, error) {
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-busy:
			cancel(errPreempted)
		case <-stop:
		}
	}()
	comp := make([]byte, end-start)
	err := readFull(rctx, l.blob, comp, start)
	if context.Cause(rctx) == errPreempted {
		return nil, errPreempted
	}
	if err != nil {
		return nil, fmt.Errorf("fetch blob bytes %d-%d: %w", start, end-1, err)
	}
	l.counted(len(comp))
	return comp, nil
}

// bucket is a token bucket of bytes.
type bucket struct {
	rate  float64 // tokens per second
	burst float64

	mu     sync.Mutex // guards tokens and last
	tokens float64
	last   time.Time
}

func newBucket(rate, burst int64) *bucket {
	return &bucket{rate: float64(rate), burst: float64(burst), tokens: float64(burst), last: time.Now()}
}

// wait takes n tokens (n <= burst), waiting until they are there.
func (b *bucket) wait(ctx context.Context, n int64) error {
	b.mu.Lock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens -= float64(n)
	deficit := -b.tokens
	b.mu.Unlock()
	if deficit <= 0 {
		return nil
	}
	t := time.NewTimer(time.Duration(deficit / b.rate * float64(time.Second)))
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
