package fetcher

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
)

// dropAfter cuts every layer blob response after n body bytes, the first cuts
// times (then serves normally when cuts is positive; always when negative).
func dropAfter(n int, cuts int32) func(http.Handler) http.Handler {
	var done atomic.Int32
	return func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !strings.Contains(r.URL.Path, "/blobs/") || r.Method != http.MethodGet ||
				(cuts >= 0 && done.Load() >= cuts) {
				h.ServeHTTP(w, r)
				return
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			if rec.Body.Len() < 10_000 { // the config, not the layer
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				w.Write(rec.Body.Bytes())
				return
			}
			done.Add(1)
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			body := rec.Body.Bytes()
			w.Write(body[:min(n, len(body))])
			// Abort the connection: the client sees an unexpected EOF.
			panic(http.ErrAbortHandler)
		})
	}
}

func TestBlobOpen(t *testing.T) {
	tests := []struct {
		name    string
		wrap    func(http.Handler) http.Handler
		wantErr bool
	}{
		{name: "one GET"},
		{name: "resumes after dropped connections", wrap: dropAfter(30_000, 3)},
		{name: "resumes on a registry that ignores Range", wrap: func(h http.Handler) http.Handler { return dropAfter(30_000, 2)(stripRange(h)) }},
		{name: "gives up after too many drops", wrap: dropAfter(1000, -1), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := serve(t, tt.wrap)
			img, err := random.Image(100_000, 1)
			if err != nil {
				t.Fatal(err)
			}
			push(t, img, host+"/blob:1")
			im, err := Resolve(context.Background(), host+"/blob:1")
			if err != nil {
				t.Fatal(err)
			}
			layers, _ := img.Layers()
			rc, _ := layers[0].Compressed()
			want, _ := io.ReadAll(rc)
			b := im.Blob(im.Layers[0])
			r, err := b.Open(context.Background())
			if err != nil {
				if tt.wantErr {
					return
				}
				t.Fatal(err)
			}
			defer r.Close()
			got, err := io.ReadAll(r)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("read %d bytes without error through a link that always drops", len(got))
				}
				return
			}
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, %v; equal: %v", len(got), err, bytes.Equal(got, want))
			}
		})
	}
}

// TestBlobOpenRange: a range streams exactly its bytes, resuming like Open,
// and gives up once it has not moved for the fetch timeout.
func TestBlobOpenRange(t *testing.T) {
	tests := []struct {
		name    string
		wrap    func(http.Handler) http.Handler
		off, n  int64
		timeout time.Duration
		wantErr string
		maxWait time.Duration
	}{
		{name: "middle", off: 12_345, n: 50_000},
		{name: "to the end", off: 60_000, n: -1},
		{name: "empty", off: 10, n: 0},
		{name: "resumes after dropped connections", wrap: dropAfter(30_000, 2), off: 5_000, n: 80_000},
		{name: "registry ignores Range", wrap: stripRange, off: 40_000, n: 30_000},
		// Whichever comes first, the fetch timeout or the last resume
		// (the backoff is jittered): either way it gives up in time.
		{name: "gives up at the fetch timeout", wrap: dropAfter(0, -1), off: 1_000, n: 50_000,
			timeout: time.Second, wantErr: "gave up after", maxWait: 3 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := serve(t, tt.wrap)
			img, err := random.Image(100_000, 1)
			if err != nil {
				t.Fatal(err)
			}
			push(t, img, host+"/blob:1")
			var opts []Option
			if tt.timeout > 0 {
				opts = append(opts, WithFetchTimeout(tt.timeout))
			}
			im, err := Resolve(context.Background(), host+"/blob:1", opts...)
			if err != nil {
				t.Fatal(err)
			}
			layers, _ := img.Layers()
			rc, _ := layers[0].Compressed()
			all, _ := io.ReadAll(rc)
			n := tt.n
			if n < 0 {
				n = int64(len(all)) - tt.off
			}
			b := im.Blob(im.Layers[0])
			start := time.Now()
			got, err := func() ([]byte, error) {
				r, err := b.OpenRange(context.Background(), tt.off, n)
				if err != nil {
					return nil, err
				}
				defer r.Close()
				return io.ReadAll(r)
			}()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one saying %q", err, tt.wantErr)
				}
				if took := time.Since(start); took > tt.maxWait {
					t.Errorf("gave up after %v, want within %v", took, tt.maxWait)
				}
				return
			}
			if err != nil || !bytes.Equal(got, all[tt.off:tt.off+n]) {
				t.Fatalf("read %d bytes, %v; want bytes %d+%d", len(got), err, tt.off, n)
			}
		})
	}
	t.Run("outside the blob", func(t *testing.T) {
		host := serve(t, nil)
		img, _ := random.Image(1000, 1)
		push(t, img, host+"/blob:1")
		im, err := Resolve(context.Background(), host+"/blob:1")
		if err != nil {
			t.Fatal(err)
		}
		b := im.Blob(im.Layers[0])
		if _, err := b.OpenRange(context.Background(), b.Size()-10, 20); err == nil {
			t.Error("a range past the end opened")
		}
	})
}
