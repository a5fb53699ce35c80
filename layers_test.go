package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/stargz-mount/stargz-mount/fetcher"
)

func TestFormatOf(t *testing.T) {
	toc := map[string]string{"containerd.io/snapshot/stargz/toc.digest": "sha256:" + strings.Repeat("1", 64)}
	zc := map[string]string{
		"io.github.containers.zstd-chunked.manifest-checksum": "sha256:" + strings.Repeat("2", 64),
		"io.github.containers.zstd-chunked.manifest-position": "10:20:30:1",
	}
	zcOld := map[string]string{
		"io.containers.zstd-chunked.manifest-checksum": "sha256:" + strings.Repeat("2", 64),
		"io.containers.zstd-chunked.manifest-position": "10:20:30:1",
	}
	tests := []struct {
		mediaType   string
		annotations map[string]string
		want        string // format, or the error's reason
	}{
		{"application/vnd.oci.image.layer.v1.tar+gzip", toc, "estargz"},
		{"application/vnd.docker.image.rootfs.diff.tar.gzip", toc, "estargz"},
		{"application/vnd.oci.image.layer.v1.tar+gzip", nil, "gzip"},
		{"application/vnd.docker.image.rootfs.diff.tar.gzip", nil, "gzip"},
		{"application/vnd.oci.image.layer.v1.tar+zstd", nil, "zstd"},
		{"application/vnd.oci.image.layer.v1.tar+zstd", zc, "zstd:chunked"},
		{"application/vnd.oci.image.layer.v1.tar+zstd", zcOld, "zstd:chunked"},
		{"application/vnd.oci.image.layer.v1.tar+zstd", toc, "zstd"},
		{"application/vnd.oci.image.layer.v1.tar", nil, "uncompressed"},
		{"application/vnd.docker.image.rootfs.diff.tar", nil, "uncompressed"},
		{"application/vnd.oci.image.layer.v1.tar+gzip+encrypted", toc, "encrypted"},
		{"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", nil, "foreign"},
		{"application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", nil, "non-distributable"},
		{"application/vnd.oci.image.config.v1+json", nil, "unknown layer media type"},
	}
	for _, tt := range tests {
		t.Run(tt.mediaType, func(t *testing.T) {
			l := fetcher.Layer{Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("f", 64)}, MediaType: types.MediaType(tt.mediaType), Annotations: tt.annotations}
			f, err := formatOf(3, l)
			if err != nil {
				if !errors.Is(err, ErrUnsupportedLayer) || !strings.Contains(err.Error(), tt.want) ||
					!strings.Contains(err.Error(), "layer 3") || !strings.Contains(err.Error(), l.Digest.String()) {
					t.Errorf("error %v, want an unsupported-layer error naming layer 3 and %q", err, tt.want)
				}
				return
			}
			if got := f.String(); got != tt.want {
				t.Errorf("format %q, want %q", got, tt.want)
			}
		})
	}
}

// TestCachedUsage: the unpacked layers' total is asked for once per
// interval or after invalidate, and a failure keeps the last good value.
func TestCachedUsage(t *testing.T) {
	calls, n := 0, int64(100)
	var fail error
	u := &cachedUsage{f: func() (int64, error) { calls++; return n, fail }, every: time.Hour}
	steps := []struct {
		name       string
		do         func()
		want       int64
		wantCalled int
	}{
		{"first get asks", func() {}, 100, 1},
		{"within the interval: cached", func() { n = 200 }, 100, 1},
		{"after invalidate: asks", func() { u.invalidate() }, 200, 2},
		{"a failure keeps the last value", func() { n, fail = 300, errors.New("scan"); u.invalidate() }, 200, 3},
		{"past the interval: asks", func() { fail = nil; u.at = time.Now().Add(-2 * time.Hour) }, 300, 4},
	}
	for _, s := range steps {
		s.do()
		if got := u.get(); got != s.want || calls != s.wantCalled {
			t.Errorf("%s: get = %d after %d calls, want %d after %d", s.name, got, calls, s.want, s.wantCalled)
		}
	}
}
