package main

import (
	"cmp"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
)

// request is one request the registry answered, timed from the tracer's
// mark. It is seen behind the shaping proxy, so its start is after the
// link delay and its end when the last body byte left towards the proxy.
type request struct {
	Start float64 `json:"start_s"`
	End   float64 `json:"end_s"`
	What  string  `json:"what"` // e.g. "GET blob sha256:abcd… bytes=0-99"
	Bytes int64   `json:"bytes"`
}

// tracer is a reverse proxy between the shaping proxy and the registry
// that records every request, so a run shows where its time went.
type tracer struct {
	ln  net.Listener
	srv *http.Server

	mu   sync.Mutex // guards mark and reqs
	mark time.Time
	reqs []*request
}

func newTracer(target string) (*tracer, error) {
	u, err := url.Parse("http://" + target)
	if err != nil {
		return nil, err
	}
	t := &tracer{mark: time.Now()}
	t.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.Out.Host = r.In.Host
		},
		FlushInterval: -1,
	}
	t.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.mu.Lock()
		rec := &request{Start: time.Since(t.mark).Seconds(), What: describe(r)}
		t.reqs = append(t.reqs, rec)
		t.mu.Unlock()
		cw := &countingWriter{ResponseWriter: w}
		rp.ServeHTTP(cw, r)
		t.mu.Lock()
		rec.End, rec.Bytes = time.Since(t.mark).Seconds(), cw.n
		t.mu.Unlock()
	})}
	go t.srv.Serve(t.ln)
	return t, nil
}

func (t *tracer) addr() string { return t.ln.Addr().String() }

func (t *tracer) close() { t.srv.Close() }

// reset forgets recorded requests and restarts the clock.
func (t *tracer) reset() {
	t.mu.Lock()
	t.mark, t.reqs = time.Now(), nil
	t.mu.Unlock()
}

// take returns the requests recorded since reset.
func (t *tracer) take() []request {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]request, len(t.reqs))
	for i, r := range t.reqs {
		out[i] = *r
	}
	return out
}

// describe names a registry request briefly.
func describe(r *http.Request) string {
	p := r.URL.Path
	kind := p
	for _, k := range []string{"/manifests/", "/blobs/"} {
		if i := strings.Index(p, k); i >= 0 {
			ref := p[i+len(k):]
			if len(ref) > 19 {
				ref = ref[:19] + "…"
			}
			kind = strings.Trim(k, "/") + " " + ref
		}
	}
	s := r.Method + " " + kind
	if rg := r.Header.Get("Range"); rg != "" {
		s += " " + rg
	}
	return s
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// maxInFlight is the most requests that overlapped in time.
func maxInFlight(reqs []request) int {
	most := 0
	for _, a := range reqs {
		n := 0
		for _, b := range reqs {
			if b.Start <= a.Start && b.End > a.Start {
				n++
			}
		}
		most = max(most, n)
	}
	return most
}

// timeline renders requests as a Markdown table, in start order.
func timeline(reqs []request) string {
	reqs = slices.Clone(reqs)
	slices.SortStableFunc(reqs, func(a, b request) int { return cmp.Compare(a.Start, b.Start) })
	var sb strings.Builder
	sb.WriteString("| start | took | request | bytes |\n| ---: | ---: | --- | ---: |\n")
	for _, r := range reqs {
		if strings.HasPrefix(r.What, "(") {
			fmt.Fprintf(&sb, "| %.0f ms | | %s | |\n", r.Start*1000, r.What)
			continue
		}
		fmt.Fprintf(&sb, "| %.0f ms | %.0f ms | `%s` | %d |\n", r.Start*1000, (r.End-r.Start)*1000, r.What, r.Bytes)
	}
	return sb.String()
}
