// Package netshape is a loopback HTTP reverse proxy that makes a local
// server look far away: it delays every request by a fixed time, caps the
// bandwidth of all responses together, and counts what passes. Tests and
// benchmarks put it in front of a registry to measure behaviour on a
// shaped link.
package netshape

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Stats counts what went through the proxy.
type Stats struct {
	Requests int64 // requests forwarded
	Bytes    int64 // response body bytes sent to clients
}

// Option configures New.
type Option func(*Proxy)

// WithDelay adds d before each request is forwarded, standing in for a
// round trip to a far server. Default 0.
func WithDelay(d time.Duration) Option { return func(p *Proxy) { p.delay = d } }

// WithBandwidth caps the response bytes of all connections together at
// bytesPerSec. Default 0: no cap.
func WithBandwidth(bytesPerSec int64) Option { return func(p *Proxy) { p.bw = bytesPerSec } }

// Proxy is a running shaping proxy.
type Proxy struct {
	delay time.Duration
	bw    int64

	target *url.URL
	ln     net.Listener
	srv    *http.Server

	requests atomic.Int64
	bytes    atomic.Int64

	mu   sync.Mutex // guards next
	next time.Time  // when the shared link is free to send again
}

// New starts a proxy on 127.0.0.1 in front of target, given as host:port
// or as a URL.
func New(target string, opts ...Option) (*Proxy, error) {
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("netshape: target %q: %w", target, err)
	}
	p := &Proxy{target: u}
	for _, o := range opts {
		o(p)
	}
	p.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("netshape: listen: %w", err)
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			// Keep the client's Host, so URLs the server builds
			// (upload locations) point back through the proxy.
			r.Out.Host = r.In.Host
		},
		ModifyResponse: func(resp *http.Response) error {
			resp.Body = &shapedBody{ReadCloser: resp.Body, p: p}
			return nil
		},
		FlushInterval: -1,
	}
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		if p.delay > 0 {
			t := time.NewTimer(p.delay)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
		rp.ServeHTTP(w, r)
	})}
	go p.srv.Serve(p.ln)
	return p, nil
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// URL is the proxy's base URL.
func (p *Proxy) URL() string { return "http://" + p.Addr() }

// Stats returns the counts since start or the last Reset.
func (p *Proxy) Stats() Stats {
	return Stats{Requests: p.requests.Load(), Bytes: p.bytes.Load()}
}

// Reset zeroes the counts.
func (p *Proxy) Reset() {
	p.requests.Store(0)
	p.bytes.Store(0)
}

// Close stops the proxy and drops open connections.
func (p *Proxy) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := p.srv.Shutdown(ctx); err != nil {
		return p.srv.Close()
	}
	return nil
}

// catchUp is how much idle time the link may make up for; without it a
// single stream loses every gap between reads and runs at a quarter of the
// cap.
const catchUp = 5 * time.Millisecond

// wait blocks until n more bytes may go over the shared link.
func (p *Proxy) wait(n int) {
	if p.bw <= 0 {
		return
	}
	d := time.Duration(float64(n) / float64(p.bw) * float64(time.Second))
	p.mu.Lock()
	now := time.Now()
	// A link that went idle may catch up on a little lost time (the gaps
	// between one body read and the next), but never on a long idle spell,
	// which would let a burst through at loopback speed.
	if floor := now.Add(-catchUp); p.next.Before(floor) {
		p.next = floor
	}
	p.next = p.next.Add(d)
	until := p.next
	p.mu.Unlock()
	time.Sleep(time.Until(until))
}

// shapedBody paces a response body through the shared link.
type shapedBody struct {
	io.ReadCloser
	p *Proxy
}

// quantum is the most one Read lets through before pacing, so concurrent
// responses interleave fairly.
const quantum = 32 << 10

func (b *shapedBody) Read(buf []byte) (int, error) {
	if len(buf) > quantum {
		buf = buf[:quantum]
	}
	n, err := b.ReadCloser.Read(buf)
	if n > 0 {
		b.p.wait(n)
		b.p.bytes.Add(int64(n))
	}
	return n, err
}
