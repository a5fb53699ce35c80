package netshape

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestProxy(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	// The Host the server saw (a string); concurrent clients' handlers
	// set it.
	var gotHost atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotHost.Store(r.Host)
		w.Write(body)
	}))
	t.Cleanup(srv.Close)

	tests := []struct {
		name    string
		opts    []Option
		clients int
		atLeast time.Duration // shaping can only slow things down
	}{
		{"unshaped", nil, 1, 0},
		{"delay", []Option{WithDelay(50 * time.Millisecond)}, 1, 50 * time.Millisecond},
		// Two clients share 10 MB/s: 2 MiB take ≥ 0.2 s together.
		{"shared bandwidth", []Option{WithBandwidth(10e6)}, 2, 200 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := New(srv.URL, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { p.Close() })
			start := time.Now()
			var wg sync.WaitGroup
			for range tc.clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, err := http.Get(p.URL() + "/x")
					if err != nil {
						t.Error(err)
						return
					}
					defer resp.Body.Close()
					got, err := io.ReadAll(resp.Body)
					if err != nil || !bytes.Equal(got, body) {
						t.Errorf("body: %d bytes, err %v", len(got), err)
					}
				}()
			}
			wg.Wait()
			if el := time.Since(start); el < tc.atLeast {
				t.Errorf("took %v, want at least %v", el, tc.atLeast)
			}
			want := Stats{Requests: int64(tc.clients), Bytes: int64(tc.clients * len(body))}
			if got := p.Stats(); got != want {
				t.Errorf("Stats() = %+v, want %+v", got, want)
			}
			if h, _ := gotHost.Load().(string); h != p.Addr() {
				t.Errorf("server saw Host %q, want the proxy's %q", h, p.Addr())
			}
			p.Reset()
			if got := p.Stats(); got != (Stats{}) {
				t.Errorf("after Reset: %+v", got)
			}
		})
	}
}

// BenchmarkSingleStream reports how close one stream gets to the bandwidth
// cap (cap_fraction): the proxy should shape a link, not be the bottleneck.
func BenchmarkSingleStream(b *testing.B) {
	const cap = 100e6
	body := bytes.Repeat([]byte{7}, 32<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
	b.Cleanup(srv.Close)
	p, err := New(srv.URL, WithBandwidth(cap))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	b.SetBytes(int64(len(body)))
	start := time.Now()
	for b.Loop() {
		resp, err := http.Get(p.URL() + "/x")
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if n != int64(len(body)) {
			b.Fatalf("got %d bytes", n)
		}
	}
	rate := float64(b.N) * float64(len(body)) / time.Since(start).Seconds()
	b.ReportMetric(rate/cap, "cap_fraction")
}
