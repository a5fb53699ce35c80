package fetcher

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"

	fp "github.com/stargz-mount/stargz-mount/internal/faultproxy"
)

// serveContent answers blob GETs itself with http.ServeContent, which does
// multipart/byteranges, after the registry has checked them with a HEAD.
func serveContent(data *[]byte) func(http.Handler) http.Handler {
	return func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Range") != "" && *data != nil {
				http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(*data))
				return
			}
			h.ServeHTTP(w, r)
		})
	}
}

func TestReadRanges(t *testing.T) {
	tests := []struct {
		name      string
		multipart bool          // the server does multipart/byteranges
		multi     fp.MultiRange // what the proxy does to them
		want      int64         // requests for the first ReadRanges of 3 ranges
		faults    []fp.Fault    // injected into the first request
	}{
		{name: "multipart", multipart: true, want: 1},
		{name: "multipart after a reset", multipart: true, faults: []fp.Fault{fp.Reset}, want: 2},
		{name: "first range only (in-process registry)", want: 1 + 3},
		{name: "200 with the whole blob", multipart: true, multi: fp.MultiWhole, want: 1 + 3},
		{name: "400", multipart: true, multi: fp.Multi400, want: 1 + 3},
		{name: "416", multipart: true, multi: fp.Multi416, want: 1 + 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var data []byte
			var wrap func(http.Handler) http.Handler
			if tt.multipart {
				wrap = serveContent(&data)
			}
			host := serve(t, wrap)
			img, _ := random.Image(300_000, 1)
			push(t, img, host+"/blob:1")
			layers, _ := img.Layers()
			rc, _ := layers[0].Compressed()
			var buf bytes.Buffer
			buf.ReadFrom(rc)
			p, err := fp.New(host, fp.WithMultiRange(tt.multi))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			im, err := Resolve(context.Background(), p.Addr()+"/blob:1", WithStallTimeout(time.Second))
			if err != nil {
				t.Fatal(err)
			}
			data = buf.Bytes()
			b := im.Blob(im.Layers[0])
			p.Script(tt.faults...)
			for round := range 2 {
				want := tt.want
				if round == 1 {
					want = 1
					if !tt.multipart || tt.multi != fp.MultiPass {
						want = 3 // known unsupported: one request per range
					}
				}
				before := b.Stats().Requests
				ranges := []Range{{Off: 10, P: make([]byte, 1000)}, {Off: 5000, P: make([]byte, 20_000)}, {Off: 200_000, P: make([]byte, 7)}}
				if err := b.ReadRanges(context.Background(), ranges); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				for _, r := range ranges {
					if !bytes.Equal(r.P, data[r.Off:r.Off+int64(len(r.P))]) {
						t.Fatalf("round %d: bytes at %d differ", round, r.Off)
					}
				}
				if got := b.Stats().Requests - before; got != want {
					t.Errorf("round %d: %d requests, want %d", round, got, want)
				}
			}
		})
	}
}
