// Package faultproxy is a loopback HTTP reverse proxy that misbehaves the
// way registries, CDNs and networks in the wild do: it resets connections
// in the middle of a body, answers 500, 503 and 429 with Retry-After,
// truncates bodies, stalls, labels ranges wrongly, refuses multi-range
// requests, and redirects blob GETs to a second server standing in for
// object storage, whose signed URLs can be made to expire (403). Tests put
// it in front of a registry.
//
// Faults hit only blob GETs with a Range header; everything else (manifests,
// auth, pushes) passes through untouched.
package faultproxy

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Fault is one kind of misbehaviour.
type Fault int

const (
	None       Fault = iota
	Reset            // send half the body, then drop the connection
	Status500        // answer 500
	Status503        // answer 503
	TooMany          // answer 429 with Retry-After: 1
	Truncate         // declare the full length, send half, close
	Stall            // send half the body, then nothing until the client gives up
	WrongRange       // label the range as starting one byte later
	numFaults
)

var faultNames = [...]string{"none", "reset", "500", "503", "429", "truncate", "stall", "wrong-range"}

func (f Fault) String() string {
	if f >= 0 && int(f) < len(faultNames) {
		return faultNames[f]
	}
	return "fault(" + strconv.Itoa(int(f)) + ")"
}

// MultiRange says what the proxy does with a request for several ranges.
type MultiRange int

const (
	MultiPass  MultiRange = iota // pass it to the registry
	MultiWhole                   // drop Range: 200 with the whole blob
	Multi400                     // answer 400
	Multi416                     // answer 416
)

// Option configures New.
type Option func(*Proxy)

// WithRate makes each blob range GET fail with probability p, the fault
// drawn uniformly from faults (all faults if none given).
func WithRate(p float64, faults ...Fault) Option {
	return func(x *Proxy) {
		x.rate = p
		if len(faults) == 0 {
			for f := Reset; f < numFaults; f++ {
				faults = append(faults, f)
			}
		}
		x.faults = faults
	}
}

// WithSeed seeds the fault choice, for reproducible runs. Default 1.
func WithSeed(s uint64) Option { return func(x *Proxy) { x.rng = rand.New(rand.NewPCG(s, s)) } }

// WithMultiRange sets how multi-range requests are treated. Default
// MultiPass.
func WithMultiRange(m MultiRange) Option { return func(x *Proxy) { x.multi = m } }

// WithRedirect makes blob GETs redirect (307) to a second server, which
// serves them from the registry under a signed URL that ExpireRedirects
// invalidates (403 from then on).
func WithRedirect() Option { return func(x *Proxy) { x.redirect = true } }

// Proxy is a running fault proxy.
type Proxy struct {
	target   *url.URL
	rate     float64
	faults   []Fault
	multi    MultiRange
	redirect bool

	front, store *httptest.Server
	rp           *httputil.ReverseProxy

	mu     sync.Mutex // guards rng, script and down
	rng    *rand.Rand
	script []Fault
	down   bool

	gen      atomic.Int64 // signature generation of redirect URLs
	injected [numFaults]atomic.Int64
	requests atomic.Int64 // blob range GETs seen (front and store)
	multis   atomic.Int64 // multi-range requests seen
	stale    atomic.Int64 // 403s for expired redirect URLs
	redirs   atomic.Int64 // redirects sent
	stop     chan struct{}
}

// New starts a proxy on 127.0.0.1 in front of target (host:port or URL).
func New(target string, opts ...Option) (*Proxy, error) {
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("faultproxy: target %q: %w", target, err)
	}
	p := &Proxy{target: u, rng: rand.New(rand.NewPCG(1, 1)), stop: make(chan struct{})}
	for _, o := range opts {
		o(p)
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.Out.Host = r.In.Host
		},
		FlushInterval: -1,
	}
	p.front = httptest.NewServer(http.HandlerFunc(p.serveFront))
	p.store = httptest.NewServer(http.HandlerFunc(p.serveStore))
	return p, nil
}

// Addr is the proxy's host:port, the registry address clients use.
func (p *Proxy) Addr() string { return strings.TrimPrefix(p.front.URL, "http://") }

// StoreAddr is the redirect target's host:port.
func (p *Proxy) StoreAddr() string { return strings.TrimPrefix(p.store.URL, "http://") }

// Close stops both servers and releases stalled responses.
func (p *Proxy) Close() {
	close(p.stop)
	p.front.CloseClientConnections()
	p.store.CloseClientConnections()
	p.front.Close()
	p.store.Close()
}

// Script makes the next blob range GETs fail with these faults, in order,
// before the random rate applies again. None lets one through.
func (p *Proxy) Script(faults ...Fault) {
	p.mu.Lock()
	p.script = append(p.script, faults...)
	p.mu.Unlock()
}

// SetDown makes the proxy drop every request (the registry is gone) or
// serve again.
func (p *Proxy) SetDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
	if down {
		p.front.CloseClientConnections()
		p.store.CloseClientConnections()
	}
}

// ExpireRedirects invalidates the signed URLs handed out so far: the
// store answers them 403.
func (p *Proxy) ExpireRedirects() { p.gen.Add(1) }

// Stats is what the proxy did.
type Stats struct {
	Requests    int64           // blob range GETs seen, at the front and the store
	MultiRange  int64           // of them, requests for several ranges
	Stale       int64           // 403s for expired redirect URLs
	Redirects   int64           // blob GETs redirected to the store
	Injected    map[Fault]int64 // faults injected
	TotalFaults int64
}

// Stats returns the counts so far.
func (p *Proxy) Stats() Stats {
	s := Stats{Requests: p.requests.Load(), MultiRange: p.multis.Load(), Stale: p.stale.Load(), Redirects: p.redirs.Load(), Injected: map[Fault]int64{}}
	for f := Reset; f < numFaults; f++ {
		if n := p.injected[f].Load(); n > 0 {
			s.Injected[f] = n
			s.TotalFaults += n
		}
	}
	return s
}

func isBlobGet(r *http.Request) bool {
	return r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:")
}

func (p *Proxy) isDown() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.down
}

func (p *Proxy) next() Fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.script) > 0 {
		f := p.script[0]
		p.script = p.script[1:]
		return f
	}
	if p.rate > 0 && p.rng.Float64() < p.rate {
		return p.faults[p.rng.IntN(len(p.faults))]
	}
	return None
}

func (p *Proxy) drop(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if c, _, err := hj.Hijack(); err == nil {
			c.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

func (p *Proxy) serveFront(w http.ResponseWriter, r *http.Request) {
	if p.isDown() {
		p.drop(w)
		return
	}
	if !isBlobGet(r) {
		p.rp.ServeHTTP(w, r)
		return
	}
	if p.redirect {
		// Let the registry check auth and existence with a HEAD first.
		head := r.Clone(r.Context())
		head.Method = http.MethodHead
		head.Header.Del("Range")
		rec := httptest.NewRecorder()
		p.rp.ServeHTTP(rec, head)
		if rec.Code != http.StatusOK {
			copyHeader(w.Header(), rec.Header())
			w.WriteHeader(rec.Code)
			return
		}
		loc := fmt.Sprintf("%s%s?X-Amz-Expires=300&sig=%d", p.store.URL, r.URL.Path, p.gen.Load())
		p.redirs.Add(1)
		http.Redirect(w, r, loc, http.StatusTemporaryRedirect)
		return
	}
	p.serveBlob(w, r)
}

func (p *Proxy) serveStore(w http.ResponseWriter, r *http.Request) {
	if p.isDown() {
		p.drop(w)
		return
	}
	if r.URL.Query().Get("sig") != strconv.FormatInt(p.gen.Load(), 10) {
		p.stale.Add(1)
		http.Error(w, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", http.StatusForbidden)
		return
	}
	// Object storage needs no registry credentials: fetch as the registry.
	r.Header.Del("Authorization")
	r.URL.RawQuery = ""
	p.serveBlob(w, r)
}

// serveBlob forwards a blob GET with the next fault applied.
func (p *Proxy) serveBlob(w http.ResponseWriter, r *http.Request) {
	rng := r.Header.Get("Range")
	if rng == "" {
		p.rp.ServeHTTP(w, r)
		return
	}
	p.requests.Add(1)
	if strings.Contains(rng, ",") {
		p.multis.Add(1)
		switch p.multi {
		case MultiWhole:
			r.Header.Del("Range")
			p.rp.ServeHTTP(w, r)
			return
		case Multi400:
			http.Error(w, "multiple ranges not supported", http.StatusBadRequest)
			return
		case Multi416:
			http.Error(w, "multiple ranges not supported", http.StatusRequestedRangeNotSatisfiable)
			return
		}
	}
	f := p.next()
	if f != None {
		p.injected[f].Add(1)
	}
	switch f {
	case Status500, Status503:
		code := http.StatusInternalServerError
		if f == Status503 {
			code = http.StatusServiceUnavailable
		}
		http.Error(w, http.StatusText(code), code)
		return
	case TooMany:
		w.Header().Set("Retry-After", "1")
		http.Error(w, "slow down", http.StatusTooManyRequests)
		return
	case None:
		p.rp.ServeHTTP(w, r)
		return
	}
	rec := httptest.NewRecorder()
	p.rp.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	copyHeader(w.Header(), rec.Header())
	switch f {
	case WrongRange:
		var start, end, size int64
		if _, err := fmt.Sscanf(rec.Header().Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &size); err == nil {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start+1, end+1, size))
		}
		w.WriteHeader(rec.Code)
		w.Write(body)
	case Reset, Truncate, Stall:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(rec.Code)
		w.Write(body[:len(body)/2])
		w.(http.Flusher).Flush()
		if f == Stall {
			select {
			case <-r.Context().Done():
			case <-p.stop:
			}
			return
		}
		if f == Reset {
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				if tc, ok := c.(*net.TCPConn); ok {
					tc.SetLinger(0) // RST, not FIN
				}
				c.Close()
				return
			}
		}
		panic(http.ErrAbortHandler) // close without the rest
	}
}

func copyHeader(dst, src http.Header) {
	for k, v := range src {
		dst[k] = v
	}
}
