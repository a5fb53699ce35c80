package fetcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Blob reads one layer blob of an image with HTTP range requests. It is safe
// for concurrent use.
type Blob struct {
	img    *Image
	digest v1.Hash
	size   int64
	url    string

	requests atomic.Int64
	bytes    atomic.Int64
	retries  atomic.Int64
	errors   atomic.Int64
	wait     atomic.Int64 // nanoseconds

	noMultiRange atomic.Bool // the registry refused a multi-range request

	mu       sync.Mutex // guards loc and locUntil
	loc      string     // where the blob GET was last redirected to, "" if nowhere
	locUntil time.Time  // when to stop using loc
}

// Stats counts a blob's traffic since it was made.
type Stats struct {
	Requests int64         // HTTP requests sent
	Bytes    int64         // body bytes received
	Retries  int64         // attempts made again after a failure
	Errors   int64         // failed attempts
	Wait     time.Duration // time reads spent on the network, queueing for a connection slot included, summed over concurrent reads
}

// Blob returns a reader over layer l's blob. No request is made until the
// first read.
func (im *Image) Blob(l Layer) *Blob {
	return &Blob{
		img:    im,
		digest: l.Digest,
		size:   l.Size,
		url:    fmt.Sprintf("%s://%s/v2/%s/blobs/%s", im.scheme, im.repo.RegistryStr(), im.repo.RepositoryStr(), l.Digest),
	}
}

// Size is the blob's size in bytes, as the manifest says.
func (b *Blob) Size() int64 { return b.size }

// Digest is the blob's digest.
func (b *Blob) Digest() v1.Hash { return b.digest }

// Stats returns the blob's counters.
func (b *Blob) Stats() Stats {
	return Stats{
		Requests: b.requests.Load(),
		Bytes:    b.bytes.Load(),
		Retries:  b.retries.Load(),
		Errors:   b.errors.Load(),
		Wait:     time.Duration(b.wait.Load()),
	}
}

// ReadAt reads len(p) bytes at off with a Range request, retrying transient
// failures within the fetch timeout. It returns io.EOF only for reads past
// the end.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	return b.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt bounded by ctx.
func (b *Blob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", b.digest, off)
	}
	if off >= b.size {
		return 0, io.EOF
	}
	want := p
	if rest := b.size - off; int64(len(want)) > rest {
		want = want[:rest]
	}
	if len(want) == 0 {
		return 0, nil
	}
	what := fmt.Sprintf("%s@%s bytes %d-%d", b.img.repo, b.digest, off, off+int64(len(want))-1)
	if err := b.retry(ctx, what, func(ctx context.Context) error { return b.get(ctx, want, off, what) }); err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// retry runs attempt until it succeeds, fails for good, or the fetch
// timeout runs out, sleeping an exponential backoff with full jitter (or
// what a 429's Retry-After asks, if longer) between attempts.
func (b *Blob) retry(ctx context.Context, what string, attempt func(context.Context) error) error {
	start := time.Now()
	ctx, cancel := context.WithDeadline(ctx, start.Add(b.img.fetchTimeout))
	defer cancel()
	var prev *Error
	for n := 0; ; n++ {
		err := attempt(ctx)
		if err == nil {
			return nil
		}
		b.errors.Add(1)
		var fe *Error
		if !errors.As(err, &fe) {
			fe = &Error{Op: "read blob", Ref: what, Kind: KindOther, Err: err}
		}
		if ctx.Err() != nil {
			// Cut short by the deadline: the cause worth naming is
			// what made the earlier attempts fail.
			if prev != nil && ctx.Err() == context.DeadlineExceeded {
				fe = prev
			}
			return b.giveUp(ctx, what, n+1, start, fe)
		}
		if !fe.Retryable() {
			return fe
		}
		prev = fe
		delay := backoff(n)
		if fe.RetryAfter > delay {
			delay = fe.RetryAfter
		}
		if dl, _ := ctx.Deadline(); time.Until(dl) < delay {
			return b.giveUp(ctx, what, n+1, start, fe)
		}
		b.img.logger.Debug("retrying blob read", "blob", what, "attempt", n+1, "in", delay.Round(time.Millisecond), "err", fe)
		b.retries.Add(1)
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return b.giveUp(ctx, what, n+1, start, fe)
		}
	}
}

// giveUp is the error of a read that ran out of time or was cancelled:
// it names the range and the last cause.
func (b *Blob) giveUp(ctx context.Context, what string, attempts int, start time.Time, last *Error) error {
	if errors.Is(context.Cause(ctx), context.Canceled) {
		return &Error{Op: "read blob", Ref: what, Kind: KindOther, Err: context.Canceled}
	}
	return &Error{Op: "read blob", Ref: what, Kind: last.Kind, Err: fmt.Errorf("gave up after %d attempt(s) in %s (fetch timeout %s): %w",
		attempts, time.Since(start).Round(time.Millisecond), b.img.fetchTimeout, unwrapOne(last))}
}

// unwrapOne drops the Op/Ref of e, which the caller repeats.
func unwrapOne(e *Error) error { return e.Err }

// Backoff parameters: attempt n sleeps a random time in [0, min(cap, base·2ⁿ)).
const (
	backoffBase = 100 * time.Millisecond
	backoffCap  = 5 * time.Second
)

func backoff(n int) time.Duration {
	d := backoffCap
	if n < 16 {
		d = min(backoffCap, backoffBase<<n)
	}
	return rand.N(d) + time.Millisecond
}

// errStalled cancels an attempt whose response went quiet.
var errStalled = errors.New("no data from the registry")

// request sends req through the host's concurrency limit with a stall
// watchdog: an attempt that receives nothing for the stall timeout is
// cancelled (and retried by the caller). It returns the response and a
// function to call when done with it; progress is to be called whenever
// body bytes arrive.
func (b *Blob) request(ctx context.Context, req *http.Request) (resp *http.Response, progress func(), done func(), err error) {
	t0 := time.Now()
	release, err := b.img.limits.acquire(ctx, req.URL.Host)
	if err != nil {
		return nil, nil, nil, err
	}
	actx, cancel := context.WithCancelCause(ctx)
	stall := b.img.stallTimeout
	watchdog := time.AfterFunc(stall, func() { cancel(errStalled) })
	progress = func() { watchdog.Reset(stall) }
	finish := func() {
		watchdog.Stop()
		cancel(nil)
		release()
		b.wait.Add(int64(time.Since(t0)))
	}
	b.requests.Add(1)
	resp, err = b.img.client.Do(req.WithContext(actx))
	if err != nil {
		if context.Cause(actx) == errStalled && ctx.Err() == nil {
			err = &Error{Op: "read blob", Kind: KindTransient, Err: fmt.Errorf("%w for %s", errStalled, stall)}
		}
		finish()
		return nil, nil, nil, err
	}
	progress()
	return resp, progress, func() { resp.Body.Close(); finish() }, nil
}

// open sends a blob GET with the given Range header to where the blob was
// last redirected, if that is still fresh, or to the registry. A cached
// location answering 401, 403 or 404 (an expired signature) is dropped and
// the registry asked again.
func (b *Blob) open(ctx context.Context, rng string) (resp *http.Response, progress func(), done func(), err error) {
	for {
		u, cached := b.location()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, nil, nil, err
		}
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		resp, progress, done, err := b.request(ctx, req)
		if err != nil {
			return nil, nil, nil, err
		}
		switch c := resp.StatusCode; {
		case cached && (c == http.StatusUnauthorized || c == http.StatusForbidden || c == http.StatusNotFound):
			done()
			b.dropLocation(u)
			b.img.logger.Debug("redirect location refused, asking the registry again", "blob", b.digest, "status", resp.Status)
			continue
		case !cached && c/100 == 2 && resp.Request.URL.String() != u:
			b.setLocation(resp.Request.URL, time.Now())
		}
		return resp, progress, done, nil
	}
}

// Redirect locations are kept at most this long.
const maxLocationAge = 5 * time.Minute

// location returns the URL to GET the blob from and whether it is a cached
// redirect location.
func (b *Blob) location() (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.loc != "" && time.Now().Before(b.locUntil) {
		return b.loc, true
	}
	b.loc = ""
	return b.url, false
}

func (b *Blob) setLocation(u *url.URL, now time.Time) {
	until := now.Add(maxLocationAge)
	if exp := signedExpiry(u, now); !exp.IsZero() {
		// Stop a little before the signature does, so a read does not race it.
		if exp = exp.Add(-10 * time.Second); exp.Before(until) {
			until = exp
		}
	}
	if !until.After(now) {
		return
	}
	b.mu.Lock()
	b.loc, b.locUntil = u.String(), until
	b.mu.Unlock()
}

func (b *Blob) dropLocation(u string) {
	b.mu.Lock()
	if b.loc == u {
		b.loc = ""
	}
	b.mu.Unlock()
}

// signedExpiry reads when a signed object storage URL expires: S3's
// X-Amz-Date + X-Amz-Expires (X-Amz-Date missing: from now), or an Expires
// Unix time (CloudFront, GCS). Zero if the URL says nothing.
func signedExpiry(u *url.URL, now time.Time) time.Time {
	q := u.Query()
	if s := q.Get("X-Amz-Expires"); s != "" {
		secs, err := strconv.ParseInt(s, 10, 64)
		if err != nil || secs < 0 {
			return now // unreadable: do not keep it
		}
		start := now
		if t, err := time.Parse("20060102T150405Z", q.Get("X-Amz-Date")); err == nil {
			start = t
		}
		return start.Add(time.Duration(secs) * time.Second)
	}
	if s := q.Get("Expires"); s != "" {
		secs, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return now
		}
		return time.Unix(secs, 0)
	}
	return time.Time{}
}

func (b *Blob) get(ctx context.Context, p []byte, off int64, what string) error {
	end := off + int64(len(p)) - 1
	resp, progress, done, err := b.open(ctx, fmt.Sprintf("bytes=%d-%d", off, end))
	if err != nil {
		return b.classify(what, err)
	}
	defer done()

	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, last, err := contentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != off || last != end {
			return &Error{Op: "read blob", Ref: what, Kind: KindTransient,
				Err: fmt.Errorf("registry sent Content-Range %q", resp.Header.Get("Content-Range"))}
		}
	case http.StatusOK:
		// The registry ignored Range and sent the whole blob: skip to off.
		if _, err := io.CopyN(io.Discard, &progressReader{resp.Body, progress}, off); err != nil {
			return b.classify(what, fmt.Errorf("skipping to %d in a whole-blob answer: %w", off, err))
		}
	default:
		return statusError(what, resp)
	}
	n, err := io.ReadFull(&progressReader{resp.Body, progress}, p)
	b.bytes.Add(int64(n))
	if err != nil {
		return b.classify(what, fmt.Errorf("short body: got %d of %d bytes: %w", n, len(p), err))
	}
	return nil
}

// classify wraps a failed attempt: a stall or a broken or short body is
// transient, network errors are "unreachable".
func (b *Blob) classify(what string, err error) error {
	var fe *Error
	if errors.As(err, &fe) {
		if fe.Ref == "" {
			fe.Ref = what
		}
		return fe
	}
	e := classify("read blob", what, err).(*Error)
	if e.Kind == KindOther && !errors.Is(err, context.Canceled) {
		e.Kind = KindTransient
	}
	return e
}

// statusError turns an HTTP error status into an Error: 429, 408 and 5xx
// are transient (429 carrying its Retry-After).
func statusError(what string, resp *http.Response) *Error {
	e := &Error{Op: "read blob", Ref: what, Kind: KindBadResponse, Err: fmt.Errorf("HTTP %s", resp.Status)}
	switch c := resp.StatusCode; {
	case c == http.StatusUnauthorized || c == http.StatusForbidden:
		e.Kind = KindUnauthorized
	case c == http.StatusNotFound:
		e.Kind = KindNotFound
	case c == http.StatusTooManyRequests || c == http.StatusRequestTimeout || c >= 500:
		e.Kind = KindTransient
		e.RetryAfter = retryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	return e
}

// retryAfter parses a Retry-After header: seconds or an HTTP date.
func retryAfter(h string, now time.Time) time.Duration {
	if h == "" {
		return 0
	}
	if s, err := strconv.Atoi(strings.TrimSpace(h)); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(h); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// progressReader calls progress after each read that returned bytes.
type progressReader struct {
	r        io.Reader
	progress func()
}

func (r *progressReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.progress()
	}
	return n, err
}

// contentRange parses "bytes START-END/SIZE" (SIZE may be *).
func contentRange(h string) (start, end int64, err error) {
	rest, ok := strings.CutPrefix(h, "bytes ")
	if !ok {
		return 0, 0, fmt.Errorf("bad Content-Range %q", h)
	}
	rest, _, _ = strings.Cut(rest, "/")
	startStr, endStr, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, 0, fmt.Errorf("bad Content-Range %q", h)
	}
	if start, err = strconv.ParseInt(strings.TrimSpace(startStr), 10, 64); err != nil {
		return 0, 0, fmt.Errorf("bad Content-Range %q", h)
	}
	if end, err = strconv.ParseInt(strings.TrimSpace(endStr), 10, 64); err != nil || end < start {
		return 0, 0, fmt.Errorf("bad Content-Range %q", h)
	}
	return start, end, nil
}

// hostLimits bounds concurrent requests per host.
type hostLimits struct {
	n   int
	sem sync.Map // host → chan struct{}
}

func (h *hostLimits) acquire(ctx context.Context, host string) (release func(), err error) {
	v, _ := h.sem.LoadOrStore(host, make(chan struct{}, h.n))
	c := v.(chan struct{})
	select {
	case c <- struct{}{}:
		return func() { <-c }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func hostArch() string { return runtime.GOARCH }

// hostPlatform is the platform picked by default on a host of
// architecture goarch: linux/goarch, arm64 as linux/arm64/v8.
func hostPlatform(goarch string) *v1.Platform {
	p := &v1.Platform{OS: "linux", Architecture: goarch}
	if goarch == "arm64" {
		p.Variant = "v8"
	}
	return p
}
