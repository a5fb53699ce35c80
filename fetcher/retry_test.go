package fetcher

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
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

func TestRedirectCache(t *testing.T) {
	p, b, data := faultyBlob(t, []fp.Option{fp.WithRedirect()})
	read := func(off int64) {
		t.Helper()
		buf := make([]byte, 5000)
		if _, err := b.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, data[off:off+5000]) {
			t.Fatalf("bytes at %d differ", off)
		}
	}
	r0 := p.Stats().Redirects // the config blob's
	for i := range 5 {
		read(int64(i) * 7000)
	}
	if s := p.Stats(); s.Redirects-r0 != 1 || s.Requests != 5 {
		t.Errorf("after 5 reads: %d redirects, %d store requests; want 1 and 5", s.Redirects-r0, s.Requests)
	}
	p.ExpireRedirects()
	read(100)
	read(200)
	if s := p.Stats(); s.Redirects-r0 != 2 || s.Stale != 1 {
		t.Errorf("after expiry: %d redirects, %d stale; want 2 and 1", s.Redirects-r0, s.Stale)
	}
	if s := b.Stats(); s.Errors != 0 {
		t.Errorf("an expired location counted as an error: %+v", s)
	}
}

func TestSignedExpiry(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		query string
		want  time.Time
	}{
		{"", time.Time{}},
		{"X-Amz-Expires=300", now.Add(300 * time.Second)},
		{"X-Amz-Date=20260102T030000Z&X-Amz-Expires=60", time.Date(2026, 1, 2, 3, 1, 0, 0, time.UTC)},
		{"X-Amz-Expires=bad", now},
		{"Expires=1767323045", time.Unix(1767323045, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			u, _ := url.Parse("https://store.example.com/blob?" + tt.query)
			if got := signedExpiry(u, now); !got.Equal(tt.want) {
				t.Errorf("signedExpiry = %v, want %v", got, tt.want)
			}
		})
	}
	t.Run("kept until shortly before it expires", func(t *testing.T) {
		b := &Blob{url: "https://registry/blob"}
		u, _ := url.Parse("https://store/blob?X-Amz-Expires=30")
		b.setLocation(u, time.Now())
		if loc, cached := b.location(); !cached || loc != u.String() {
			t.Fatalf("location = %s, %v", loc, cached)
		}
		b.setLocation(u, time.Now().Add(-25*time.Second))
		if loc, cached := b.location(); cached {
			t.Fatalf("expiring location still used: %s", loc)
		}
	})
}
