package fetcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// serve runs go-containerregistry's in-process registry, optionally wrapped,
// and returns its host:port.
func serve(t *testing.T, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	var h http.Handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	u, _ := url.Parse(s.URL)
	return u.Host
}

func push(t *testing.T, img v1.Image, ref string) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

func withPlatform(t *testing.T, img v1.Image, os, arch string) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = os, arch
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestResolve(t *testing.T) {
	host := serve(t, nil)
	img, err := random.Image(1024, 3)
	if err != nil {
		t.Fatal(err)
	}
	img = withPlatform(t, img, "linux", hostArch())
	push(t, img, host+"/app:1.0")
	want, _ := img.Digest()

	arm := withPlatform(t, mustRandom(t), "linux", "arm64")
	amd := withPlatform(t, mustRandom(t), "linux", "amd64")
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
	)
	r, _ := name.ParseReference(host + "/multi:latest")
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
	armDigest, _ := arm.Digest()
	amdDigest, _ := amd.Digest()
	hostDigest := amdDigest
	if hostArch() == "arm64" {
		hostDigest = armDigest
	}

	tests := []struct {
		name     string
		ref      string
		opts     []Option
		digest   v1.Hash
		platform string
		kind     Kind
	}{
		{name: "tag", ref: host + "/app:1.0", digest: want},
		{name: "digest", ref: host + "/app@" + want.String(), digest: want},
		{name: "index picks host platform", ref: host + "/multi", digest: hostDigest},
		{name: "index with --platform", ref: host + "/multi", opts: []Option{WithPlatform(&v1.Platform{OS: "linux", Architecture: "arm64"})}, digest: armDigest, platform: "linux/arm64"},
		{name: "platform not in index", ref: host + "/multi", opts: []Option{WithPlatform(&v1.Platform{OS: "linux", Architecture: "s390x"})}, kind: KindOther},
		{name: "--platform not matching a single image", ref: host + "/app:1.0", opts: []Option{WithPlatform(&v1.Platform{OS: "linux", Architecture: "s390x"})}, kind: KindNotFound},
		{name: "missing tag", ref: host + "/app:nope", kind: KindNotFound},
		{name: "missing repo", ref: host + "/nothing:here", kind: KindNotFound},
		{name: "bad reference", ref: "UPPER/Case::x", kind: KindBadReference},
		{name: "unreachable", ref: lt.ClosedAddr(t) + "/app:1.0", kind: KindUnreachable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			im, err := Resolve(context.Background(), tt.ref, tt.opts...)
			if tt.digest == (v1.Hash{}) {
				var fe *Error
				if !errors.As(err, &fe) {
					t.Fatalf("Resolve(%q) = %v, want *Error of kind %d", tt.ref, err, tt.kind)
				}
				if fe.Kind != tt.kind {
					t.Errorf("Resolve(%q) kind = %d, want %d (%v)", tt.ref, fe.Kind, tt.kind, err)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error spans lines: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Resolve(%q): %v", tt.ref, err)
			}
			if im.Digest != tt.digest {
				t.Errorf("digest = %s, want %s", im.Digest, tt.digest)
			}
			if tt.platform != "" && im.Platform.OS+"/"+im.Platform.Architecture != tt.platform {
				t.Errorf("platform = %v, want %s", im.Platform, tt.platform)
			}
			if len(im.Layers) != len(im.Manifest.Layers) || im.Config == nil {
				t.Errorf("layers = %d, config = %v", len(im.Layers), im.Config)
			}
		})
	}
}

// TestResolveHostPlatform picks from indexes on hosts of other
// architectures: arm64 with no variant is arm64/v8, as containerd has it.
func TestResolveHostPlatform(t *testing.T) {
	host := serve(t, nil)
	imgs := map[string]v1.Image{}
	digests := map[string]v1.Hash{}
	for _, p := range []string{"linux/amd64", "linux/arm64", "linux/arm64/v8", "linux/arm64/v9", "linux/arm/v7"} {
		pl, err := ParsePlatform(p)
		if err != nil {
			t.Fatal(err)
		}
		img := withPlatform(t, mustRandom(t), pl.OS, pl.Architecture)
		imgs[p] = img
		digests[p], _ = img.Digest()
	}
	pushIndex := func(tag string, platforms ...string) string {
		var adds []mutate.IndexAddendum
		for _, p := range platforms {
			pl, _ := ParsePlatform(p)
			adds = append(adds, mutate.IndexAddendum{Add: imgs[p], Descriptor: v1.Descriptor{Platform: pl}})
		}
		ref := host + "/multi:" + tag
		r, _ := name.ParseReference(ref)
		if err := remote.WriteIndex(r, mutate.AppendManifests(empty.Index, adds...)); err != nil {
			t.Fatal(err)
		}
		return ref
	}
	plain := pushIndex("plain", "linux/amd64", "linux/arm/v7", "linux/arm64")
	v8 := pushIndex("v8", "linux/amd64", "linux/arm64/v8")
	v9first := pushIndex("v9first", "linux/arm64/v9", "linux/arm64")
	single := host + "/single:arm64"
	push(t, imgs["linux/arm64"], single) // its config says linux/arm64, no variant

	arch := func(a string) Option { return func(o *options) { o.goarch = a } }
	platform := func(s string) Option {
		p, err := ParsePlatform(s)
		if err != nil {
			t.Fatal(err)
		}
		return WithPlatform(p)
	}
	tests := []struct {
		name string
		ref  string
		opts []Option
		want string // the platform of the image picked; "" for an error
	}{
		{"arm64 host, index entry without variant", plain, []Option{arch("arm64")}, "linux/arm64"},
		{"arm64 host, index entry arm64/v8", v8, []Option{arch("arm64")}, "linux/arm64/v8"},
		{"arm64 host, v9 listed first", v9first, []Option{arch("arm64")}, "linux/arm64"},
		{"amd64 host", plain, []Option{arch("amd64")}, "linux/amd64"},
		{"arm host picks arm/v7 for no variant asked", plain, []Option{arch("arm")}, "linux/arm/v7"},
		{"s390x host", plain, []Option{arch("s390x")}, ""},
		{"--platform linux/arm64/v8, entry without variant", plain, []Option{platform("linux/arm64/v8")}, "linux/arm64"},
		{"--platform linux/arm64, entry arm64/v8", v8, []Option{platform("linux/arm64")}, "linux/arm64/v8"},
		{"--platform linux/arm64/v9, entry without variant", plain, []Option{platform("linux/arm64/v9")}, ""},
		{"--platform linux/arm64/v8, single image without variant", single, []Option{platform("linux/arm64/v8")}, "linux/arm64"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			im, err := Resolve(context.Background(), tt.ref, tt.opts...)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("Resolve(%q) picked %s, want an error", tt.ref, im.Digest)
				}
				return
			}
			if err != nil {
				t.Fatalf("Resolve(%q): %v", tt.ref, err)
			}
			if im.Digest != digests[tt.want] {
				t.Errorf("picked %s, want the %s image %s", im.Digest, tt.want, digests[tt.want])
			}
		})
	}
}

func mustRandom(t *testing.T) v1.Image {
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestBlobReadAt(t *testing.T) {
	tests := []struct {
		name    string
		wrap    func(http.Handler) http.Handler
		wantErr bool
	}{
		{name: "range requests"},
		{name: "registry ignores Range", wrap: stripRange},
		{name: "wrong Content-Range", wrap: lieAboutRange, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host := serve(t, tt.wrap)
			img, err := random.Image(100_000, 1)
			if err != nil {
				t.Fatal(err)
			}
			push(t, img, host+"/blob:1")
			im, err := Resolve(context.Background(), host+"/blob:1", WithFetchTimeout(time.Second))
			if err != nil {
				t.Fatal(err)
			}
			layers, _ := img.Layers()
			rc, _ := layers[0].Compressed()
			data, _ := io.ReadAll(rc)
			b := im.Blob(im.Layers[0])
			if b.Size() != int64(len(data)) {
				t.Fatalf("Size = %d, want %d", b.Size(), len(data))
			}
			for _, r := range []struct{ off, n int64 }{{0, 1}, {0, 4096}, {777, 10_000}, {int64(len(data)) - 5, 5}} {
				p := make([]byte, r.n)
				n, err := b.ReadAt(p, r.off)
				if tt.wantErr {
					if err == nil {
						t.Fatalf("ReadAt(%d, %d) succeeded against a lying registry", r.off, r.n)
					}
					return
				}
				if err != nil || n != int(r.n) || !bytes.Equal(p, data[r.off:r.off+r.n]) {
					t.Fatalf("ReadAt(%d, %d) = %d, %v; bytes equal: %v", r.off, r.n, n, err, bytes.Equal(p, data[r.off:r.off+r.n]))
				}
			}
			// Past the end: a short read with io.EOF, and nothing past it.
			p := make([]byte, 10)
			n, err := b.ReadAt(p, int64(len(data))-4)
			if n != 4 || err != io.EOF {
				t.Errorf("ReadAt at end = %d, %v; want 4, EOF", n, err)
			}
			if n, err := b.ReadAt(p, int64(len(data))); n != 0 || err != io.EOF {
				t.Errorf("ReadAt past end = %d, %v; want 0, EOF", n, err)
			}
			if s := b.Stats(); s.Requests < 5 || s.Bytes < 4+1+4096+10_000+5 || s.Retries != 0 || s.Errors != 0 || s.Wait <= 0 {
				t.Errorf("Stats = %+v", s)
			}
		})
	}
}

// stripRange makes the registry answer every blob GET with the whole blob.
func stripRange(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Header.Del("Range")
		h.ServeHTTP(w, r)
	})
}

// lieAboutRange serves the range asked for but labels it as starting one
// byte later.
func lieAboutRange(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") == "" {
			h.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		var start, end, size int64
		fmt.Sscanf(rec.Header().Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &size)
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start+1, end+1, size))
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
	})
}

func TestScheme(t *testing.T) {
	tests := []struct {
		host  string
		plain bool
		want  string
	}{
		{"localhost:5000", false, "http"},
		{"127.0.0.1:5000", false, "http"},
		{"127.1.2.3", false, "http"},
		{"[::1]:5000", false, "http"},
		{"registry.example.com", false, "https"},
		{"10.0.0.1:5000", false, "https"},
		{"registry.example.com", true, "http"},
	}
	for _, tt := range tests {
		reg, err := name.NewRegistry(tt.host)
		if err != nil {
			t.Fatalf("%s: %v", tt.host, err)
		}
		if got := scheme(reg, tt.plain); got != tt.want {
			t.Errorf("scheme(%s, %v) = %s, want %s", tt.host, tt.plain, got, tt.want)
		}
	}
}

func TestParsePlatform(t *testing.T) {
	for in, ok := range map[string]bool{"linux/amd64": true, "linux/arm/v7": true, "linux": false, "/amd64": false, "a/b/c/d": false} {
		_, err := ParsePlatform(in)
		if (err == nil) != ok {
			t.Errorf("ParsePlatform(%q) error = %v, want ok=%v", in, err, ok)
		}
	}
}

func remoteWrite(r name.Reference, img v1.Image, a authn.Authenticator) error {
	return remote.Write(r, img, remote.WithAuth(a))
}

// TestLazyConfig: with WithLazyConfig, Resolve returns with the manifest
// while the config is still on its way (held here), WaitConfig sets it,
// and a config the registry fails to serve fails WaitConfig.
func TestLazyConfig(t *testing.T) {
	var hold atomic.Bool
	release := make(chan struct{})
	cfgDigest := make(chan string, 1)
	host := serve(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case d := <-cfgDigest:
				cfgDigest <- d
				if strings.HasSuffix(r.URL.Path, "/blobs/"+d) && hold.Load() {
					<-release
					http.Error(w, "gone", http.StatusNotFound)
					return
				}
			default:
			}
			h.ServeHTTP(w, r)
		})
	})
	img := withPlatform(t, mustRandom(t), "linux", hostArch())
	push(t, img, host+"/lazy:1")
	cd, _ := img.ConfigName()
	cfgDigest <- cd.String()

	t.Run("served", func(t *testing.T) {
		im, err := Resolve(context.Background(), host+"/lazy:1", WithLazyConfig())
		if err != nil {
			t.Fatal(err)
		}
		if err := im.WaitConfig(context.Background()); err != nil {
			t.Fatal(err)
		}
		if im.Config == nil || im.Platform.Architecture != hostArch() {
			t.Errorf("after WaitConfig: config %v, platform %v", im.Config, im.Platform)
		}
	})
	t.Run("held, then missing", func(t *testing.T) {
		hold.Store(true)
		im, err := Resolve(context.Background(), host+"/lazy:1", WithLazyConfig())
		if err != nil {
			t.Fatal(err)
		}
		if im.Config != nil || len(im.Layers) == 0 {
			t.Fatalf("Resolve waited for the config, or has no layers: config %v, %d layers", im.Config, len(im.Layers))
		}
		close(release)
		err = im.WaitConfig(context.Background())
		var fe *Error
		if !errors.As(err, &fe) || fe.Op != "fetch config" {
			t.Errorf("WaitConfig = %v, want a fetch config error", err)
		}
	})
}

// TestManifestWithoutPing: the manifest of a registry that serves
// anonymous pulls is asked for at once, not after the ping (held here
// until the manifest has been asked for).
func TestManifestWithoutPing(t *testing.T) {
	manifestAsked := make(chan struct{})
	var once sync.Once
	var armed atomic.Bool
	host := serve(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch {
			case !armed.Load():
			case r.URL.Path == "/v2/":
				select {
				case <-manifestAsked:
				case <-time.After(10 * time.Second):
				}
			case strings.Contains(r.URL.Path, "/manifests/"):
				once.Do(func() { close(manifestAsked) })
			}
			h.ServeHTTP(w, r)
		})
	})
	img := withPlatform(t, mustRandom(t), "linux", hostArch())
	push(t, img, host+"/anon:1")
	armed.Store(true)
	start := time.Now()
	if _, err := Resolve(context.Background(), host+"/anon:1"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Resolve took %v: the manifest waited for the ping", d)
	}
}
