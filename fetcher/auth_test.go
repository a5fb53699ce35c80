package fetcher

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

func writeAuth(t *testing.T, path, key, user, pass string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	a := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(path, []byte(`{"auths":{"`+key+`":{"auth":"`+a+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestKeychain(t *testing.T) {
	const reg = "registry.example.com"
	tests := []struct {
		name  string
		setup func(t *testing.T, home string)
		creds [2]string
		repo  string
		want  string // user, "" for anonymous
	}{
		{name: "nothing", setup: func(*testing.T, string) {}, want: ""},
		{name: "--creds", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, ".docker/config.json"), reg, "docker", "x")
		}, creds: [2]string{"flag", "pw:with:colons"}, want: "flag"},
		{name: "docker config", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, ".docker/config.json"), "https://"+reg, "docker", "x")
		}, want: "docker"},
		{name: "DOCKER_CONFIG", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, "elsewhere/config.json"), reg, "dockerenv", "x")
			t.Setenv("DOCKER_CONFIG", filepath.Join(home, "elsewhere"))
		}, want: "dockerenv"},
		{name: "REGISTRY_AUTH_FILE before docker", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, ".docker/config.json"), reg, "docker", "x")
			writeAuth(t, filepath.Join(home, "auth.json"), reg, "podmanenv", "x")
			t.Setenv("REGISTRY_AUTH_FILE", filepath.Join(home, "auth.json"))
		}, want: "podmanenv"},
		{name: "XDG_RUNTIME_DIR auth.json", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, "run/containers/auth.json"), reg, "podmanrun", "x")
			t.Setenv("XDG_RUNTIME_DIR", filepath.Join(home, "run"))
		}, want: "podmanrun"},
		{name: "~/.config/containers/auth.json", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, ".config/containers/auth.json"), reg, "podmanhome", "x")
		}, want: "podmanhome"},
		{name: "repository-scoped key", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, ".config/containers/auth.json"), reg+"/team", "team", "x")
		}, repo: "team/app", want: "team"},
		{name: "other repository's key", setup: func(t *testing.T, home string) {
			writeAuth(t, filepath.Join(home, ".config/containers/auth.json"), reg+"/team", "team", "x")
		}, repo: "other/app", want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			home := t.TempDir()
			t.Setenv("HOME", home)
			t.Setenv("DOCKER_CONFIG", "")
			t.Setenv("REGISTRY_AUTH_FILE", "")
			t.Setenv("XDG_RUNTIME_DIR", "")
			t.Setenv("XDG_CONFIG_HOME", "")
			os.Unsetenv("DOCKER_CONFIG")
			tt.setup(t, home)
			repo := tt.repo
			if repo == "" {
				repo = "app"
			}
			r, err := name.NewRepository(reg + "/" + repo)
			if err != nil {
				t.Fatal(err)
			}
			a, err := Keychain(tt.creds[0], tt.creds[1]).Resolve(r)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := a.Authorization()
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Username != tt.want {
				t.Errorf("user = %q, want %q", cfg.Username, tt.want)
			}
			if tt.creds[1] != "" && cfg.Password != tt.creds[1] {
				t.Errorf("password = %q, want %q", cfg.Password, tt.creds[1])
			}
		})
	}
}

// basicAuth requires user:pass on every request.
func basicAuth(user, pass string) func(http.Handler) http.Handler {
	return func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
				return
			}
			h.ServeHTTP(w, r)
		})
	}
}

func TestCredsAndMirror(t *testing.T) {
	origin := serve(t, nil)
	mirrorHost := serve(t, nil)
	img, _ := random.Image(1000, 1)
	push(t, img, origin+"/app:1")
	push(t, img, mirrorHost+"/app:1")
	locked := serve(t, basicAuth("alice", "s3cret"))
	push(t, img, origin+"/locked:1") // pushed unlocked; copied below
	want, _ := img.Digest()

	t.Run("mirror first", func(t *testing.T) {
		im, err := Resolve(context.Background(), origin+"/app:1", WithMirror(origin, mirrorHost))
		if err != nil {
			t.Fatal(err)
		}
		if im.repo.RegistryStr() != mirrorHost || im.Ref.Context().RegistryStr() != origin || im.Digest != want {
			t.Errorf("resolved through %s as %s, want the mirror %s keeping the reference", im.repo.RegistryStr(), im.Ref, mirrorHost)
		}
	})
	t.Run("origin when the mirror is down", func(t *testing.T) {
		im, err := Resolve(context.Background(), origin+"/app:1", WithMirror(origin, lt.ClosedAddr(t)))
		if err != nil {
			t.Fatal(err)
		}
		if im.repo.RegistryStr() != origin {
			t.Errorf("resolved through %s, want the origin", im.repo.RegistryStr())
		}
	})
	t.Run("creds", func(t *testing.T) {
		// Seed the locked registry through its own auth.
		r, _ := name.ParseReference(locked + "/app:1")
		if err := remoteWrite(r, img, authn.FromConfig(authn.AuthConfig{Username: "alice", Password: "s3cret"})); err != nil {
			t.Fatal(err)
		}
		if _, err := Resolve(context.Background(), locked+"/app:1", WithKeychain(Keychain("alice", "s3cret"))); err != nil {
			t.Fatalf("with right creds: %v", err)
		}
		_, err := Resolve(context.Background(), locked+"/app:1", WithKeychain(Keychain("alice", "wrong")))
		var fe *Error
		if !errors.As(err, &fe) || fe.Kind != KindUnauthorized || !strings.Contains(err.Error(), "unauthorized") {
			t.Fatalf("with wrong creds: %v, want an unauthorized error", err)
		}
	})
}

// tokenAuth demands bearer tokens from its own /token endpoint that expire
// after ttl, and counts the tokens issued.
func tokenAuth(ttl time.Duration, issued *atomic.Int64) func(http.Handler) http.Handler {
	var mu sync.Mutex
	tokens := map[string]time.Time{} // token → expiry
	return func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/token" {
				tok := fmt.Sprintf("tok-%d", issued.Add(1))
				mu.Lock()
				tokens[tok] = time.Now().Add(ttl)
				mu.Unlock()
				fmt.Fprintf(w, `{"token":%q,"expires_in":%d}`, tok, int(ttl.Seconds()))
				return
			}
			tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			mu.Lock()
			exp, ok := tokens[tok]
			mu.Unlock()
			if !ok || time.Now().After(exp) {
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="test",scope="repository:app:pull"`, r.Host))
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}`, http.StatusUnauthorized)
				return
			}
			h.ServeHTTP(w, r)
		})
	}
}

func TestTokenRefresh(t *testing.T) {
	var issued atomic.Int64
	open := serve(t, nil)
	img, _ := random.Image(50_000, 1)
	push(t, img, open+"/app:1")
	// The same storage behind token auth: a proxy to the open registry.
	host := serve(t, func(http.Handler) http.Handler {
		u, _ := url.Parse("http://" + open)
		return tokenAuth(time.Second, &issued)(httputil.NewSingleHostReverseProxy(u))
	})
	im, err := Resolve(context.Background(), host+"/app:1")
	if err != nil {
		t.Fatal(err)
	}
	b := im.Blob(im.Layers[0])
	first := issued.Load()
	deadline := time.Now().Add(3500 * time.Millisecond)
	reads := 0
	for time.Now().Before(deadline) {
		if _, err := b.ReadAt(make([]byte, 100), int64(reads*100)); err != nil {
			t.Fatalf("read %d, %s after the first token: %v", reads, time.Since(deadline.Add(-3500*time.Millisecond)), err)
		}
		reads++
		time.Sleep(200 * time.Millisecond)
	}
	if got := issued.Load() - first; got < 2 {
		t.Errorf("%d new tokens over 3.5 s of reads with 1 s tokens, want at least 2", got)
	}
	if s := b.Stats(); s.Errors != 0 {
		t.Errorf("an expired token cost a failed attempt: %+v", s)
	}
}
