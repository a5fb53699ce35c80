package fetcher

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// mapMeta is a MetadataStore in memory.
type mapMeta struct {
	mu sync.Mutex // guards m
	m  map[string][]byte
}

func (s *mapMeta) Get(k string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.m[k]
	return b, ok
}

func (s *mapMeta) Put(k string, b []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[k] = append([]byte(nil), b...)
	return nil
}

// TestMetadataStore resolves with the registry up, stops it, and resolves
// again from the store: by digest silently, by tag with a warning.
func TestMetadataStore(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	img := withPlatform(t, mustRandom(t), "linux", hostArch())
	push(t, img, host+"/app:1")
	push(t, withPlatform(t, mustRandom(t), "linux", hostArch()), host+"/other:1")
	want, _ := img.Digest()
	store := &mapMeta{m: map[string][]byte{}}
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	opts := []Option{WithMetadataStore(store), WithLogger(logger)}
	ctx := context.Background()

	// Only the tag is resolved online: its digest resolves offline too.
	if _, err := Resolve(ctx, host+"/app:1", opts...); err != nil {
		t.Fatal(err)
	}
	srv.Close()

	tests := []struct {
		name    string
		ref     string
		opts    []Option
		kind    Kind // of the error; -1 for success
		warning bool
	}{
		{"digest", host + "/app@" + want.String(), opts, -1, false},
		{"tag falls back", host + "/app:1", opts, -1, true},
		{"tag never resolved", host + "/app:2", opts, KindUnreachable, false},
		{"other platform", host + "/app:1", append([]Option{WithPlatform(&v1.Platform{OS: "linux", Architecture: "s390x"})}, opts...), KindUnreachable, false},
		{"no store", host + "/app@" + want.String(), nil, KindUnreachable, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs.Reset()
			im, err := Resolve(ctx, tt.ref, tt.opts...)
			if tt.kind >= 0 {
				var fe *Error
				if !errors.As(err, &fe) || fe.Kind != tt.kind {
					t.Fatalf("Resolve = %v, want error of kind %d", err, tt.kind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if im.Digest != want || len(im.Layers) != 1 || im.Config == nil {
				t.Errorf("digest %s, %d layers", im.Digest, len(im.Layers))
			}
			if got := strings.Contains(logs.String(), "level=WARN"); got != tt.warning {
				t.Errorf("warning = %v, want %v: %s", got, tt.warning, logs.String())
			}
		})
	}

	t.Run("damaged manifest is not used", func(t *testing.T) {
		k := blobKey("manifest", want)
		store.m[k] = append(store.m[k], ' ')
		if _, err := Resolve(ctx, host+"/app@"+want.String(), opts...); err == nil {
			t.Error("resolved from a manifest that does not match its digest")
		}
	})
}
