package fetcher

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"

	fp "github.com/stargz-mount/stargz-mount/internal/faultproxy"
)

// faultyBlob pushes a random one-layer image to an in-process registry
// behind a fault proxy and returns the proxy, the blob and its bytes.
func faultyBlob(t *testing.T, popts []fp.Option, opts ...Option) (*fp.Proxy, *Blob, []byte) {
	t.Helper()
	host := serve(t, nil)
	img, err := random.Image(200_000, 1)
	if err != nil {
		t.Fatal(err)
	}
	push(t, img, host+"/blob:1")
	p, err := fp.New(host, popts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	im, err := Resolve(context.Background(), p.Addr()+"/blob:1", opts...)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	rc, _ := layers[0].Compressed()
	data, _ := io.ReadAll(rc)
	return p, im.Blob(im.Layers[0]), data
}

func TestBlobRetries(t *testing.T) {
	tests := []struct {
		name     string
		faults   []fp.Fault
		redirect bool
		minTime  time.Duration // Retry-After honoured
	}{
		{name: "500", faults: []fp.Fault{fp.Status500}},
		{name: "503 twice", faults: []fp.Fault{fp.Status503, fp.Status503}},
		{name: "429 with Retry-After", faults: []fp.Fault{fp.TooMany}, minTime: time.Second},
		{name: "reset mid-body", faults: []fp.Fault{fp.Reset}},
		{name: "truncated body", faults: []fp.Fault{fp.Truncate}},
		{name: "stall", faults: []fp.Fault{fp.Stall}},
		{name: "wrong Content-Range", faults: []fp.Fault{fp.WrongRange}},
		{name: "everything", faults: []fp.Fault{fp.Reset, fp.Status500, fp.Truncate, fp.WrongRange, fp.Stall}},
		{name: "redirected, then a fault at the store", faults: []fp.Fault{fp.Reset}, redirect: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var popts []fp.Option
			if tt.redirect {
				popts = append(popts, fp.WithRedirect())
			}
			p, b, data := faultyBlob(t, popts, WithFetchTimeout(20*time.Second), WithStallTimeout(300*time.Millisecond))
			p.Script(tt.faults...)
			buf := make([]byte, 100_000)
			start := time.Now()
			n, err := b.ReadAt(buf, 1234)
			if err != nil || n != len(buf) {
				t.Fatalf("ReadAt = %d, %v", n, err)
			}
			if !bytes.Equal(buf, data[1234:1234+len(buf)]) {
				t.Fatal("bytes differ")
			}
			if d := time.Since(start); d < tt.minTime {
				t.Errorf("read took %s, less than Retry-After %s", d, tt.minTime)
			}
			s := b.Stats()
			if s.Retries != int64(len(tt.faults)) || s.Errors != int64(len(tt.faults)) {
				t.Errorf("Stats = %+v, want %d retries and errors", s, len(tt.faults))
			}
			if got := p.Stats().TotalFaults; got != int64(len(tt.faults)) {
				t.Errorf("proxy injected %d faults, want %d", got, len(tt.faults))
			}
		})
	}
}

func TestBlobGivesUp(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(p *fp.Proxy)
		kind    Kind
		within  time.Duration
		message string
	}{
		{name: "always 503", setup: func(p *fp.Proxy) { p.Script(repeat(fp.Status503, 100)...) },
			kind: KindTransient, within: 2 * time.Second, message: "503"},
		{name: "registry gone", setup: func(p *fp.Proxy) { p.SetDown(true) },
			kind: KindUnreachable, within: 2 * time.Second, message: "registry unreachable"},
		{name: "always stalls", setup: func(p *fp.Proxy) { p.Script(repeat(fp.Stall, 100)...) },
			kind: KindTransient, within: 2 * time.Second, message: "no data from the registry"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, b, _ := faultyBlob(t, nil, WithFetchTimeout(time.Second), WithStallTimeout(200*time.Millisecond))
			tt.setup(p)
			start := time.Now()
			_, err := b.ReadAt(make([]byte, 1000), 5000)
			d := time.Since(start)
			var fe *Error
			if !errors.As(err, &fe) || fe.Kind != tt.kind {
				t.Fatalf("ReadAt error = %v, want kind %d", err, tt.kind)
			}
			if d > tt.within {
				t.Errorf("gave up after %s, want within %s", d, tt.within)
			}
			for _, want := range []string{"bytes 5000-5999", tt.message, "gave up after"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name %q", err, want)
				}
			}
			if b.Stats().Retries == 0 {
				t.Errorf("no retries: %+v", b.Stats())
			}
		})
	}
	t.Run("not found is not retried", func(t *testing.T) {
		_, b, _ := faultyBlob(t, nil, WithFetchTimeout(5*time.Second))
		b.url = strings.Replace(b.url, "sha256:", "sha256:0", 1)[:len(b.url)]
		_, err := b.ReadAt(make([]byte, 10), 0)
		var fe *Error
		if !errors.As(err, &fe) || fe.Kind != KindNotFound || b.Stats().Retries != 0 {
			t.Fatalf("err = %v, stats %+v; want not found without retries", err, b.Stats())
		}
	})
}

func repeat(f fp.Fault, n int) []fp.Fault {
	s := make([]fp.Fault, n)
	for i := range s {
		s[i] = f
	}
	return s
}

func TestMaxConcurrentFetches(t *testing.T) {
	var cur, peak atomic.Int64
	host := serve(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "" {
				n := cur.Add(1)
				defer cur.Add(-1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				time.Sleep(20 * time.Millisecond)
			}
			h.ServeHTTP(w, r)
		})
	})
	img, _ := random.Image(100_000, 1)
	push(t, img, host+"/blob:1")
	im, err := Resolve(context.Background(), host+"/blob:1", WithMaxConcurrentFetches(3))
	if err != nil {
		t.Fatal(err)
	}
	b := im.Blob(im.Layers[0])
	done := make(chan error)
	for i := range 20 {
		go func() {
			_, err := b.ReadAt(make([]byte, 100), int64(i*1000))
			done <- err
		}()
	}
	for range 20 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if p := peak.Load(); p != 3 {
		t.Errorf("peak concurrent requests = %d, want 3", p)
	}
}
