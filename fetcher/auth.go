package fetcher

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
)

// Keychain finds credentials for a registry in, first match wins:
//  1. the user and password given with WithCreds (--creds USER:PASS);
//  2. podman's REGISTRY_AUTH_FILE, if set;
//  3. the Docker config (DOCKER_CONFIG or ~/.docker/config.json) with its
//     credential helpers and store (authn.DefaultKeychain);
//  4. podman's $XDG_RUNTIME_DIR/containers/auth.json;
//  5. podman's ~/.config/containers/auth.json (XDG_CONFIG_HOME honoured).
//
// Without a match the registry is asked anonymously. Unreadable files are
// an error; missing ones are skipped.
func Keychain(user, password string) authn.Keychain {
	var ks []authn.Keychain
	if user != "" || password != "" {
		ks = append(ks, staticKeychain{authn.AuthConfig{Username: user, Password: password}})
	}
	if f := os.Getenv("REGISTRY_AUTH_FILE"); f != "" {
		ks = append(ks, authFile(f))
	}
	ks = append(ks, dockerKeychain{})
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		ks = append(ks, authFile(filepath.Join(d, "containers", "auth.json")))
	}
	cfg := os.Getenv("XDG_CONFIG_HOME")
	if cfg == "" {
		if h, err := os.UserHomeDir(); err == nil {
			cfg = filepath.Join(h, ".config")
		}
	}
	if cfg != "" {
		ks = append(ks, authFile(filepath.Join(cfg, "containers", "auth.json")))
	}
	return authn.NewMultiKeychain(ks...)
}

// ParseCreds splits "USER:PASS" (the password may hold colons).
func ParseCreds(s string) (user, password string, err error) {
	user, password, ok := strings.Cut(s, ":")
	if !ok || user == "" {
		return "", "", errors.New("want USER:PASS")
	}
	return user, password, nil
}

// dockerKeychain is authn.DefaultKeychain where a Docker config exists;
// without one, DefaultKeychain would read podman's files by its own looser
// rules, and Keychain reads those itself.
type dockerKeychain struct{}

func (dockerKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	dirs := []string{os.Getenv("DOCKER_CONFIG")}
	if h, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(h, ".docker"))
	}
	for _, d := range dirs {
		if d == "" {
			continue
		}
		if _, err := os.Stat(filepath.Join(d, "config.json")); err == nil {
			return authn.DefaultKeychain.Resolve(r)
		}
	}
	return authn.Anonymous, nil
}

type staticKeychain struct{ cfg authn.AuthConfig }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return authn.FromConfig(k.cfg), nil
}

// authFile is a podman (containers-auth.json(5)) auth file: the "auths"
// of a Docker config, whose keys may also name a repository or namespace
// ("registry.example.com/team"), the most specific winning.
type authFile string

func (f authFile) Resolve(r authn.Resource) (authn.Authenticator, error) {
	b, err := os.ReadFile(string(f))
	if errors.Is(err, fs.ErrNotExist) {
		return authn.Anonymous, nil
	}
	if err != nil {
		return nil, fmt.Errorf("auth file: %w", err)
	}
	var file struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			IdentityToken string `json:"identitytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(b, &file); err != nil {
		return nil, fmt.Errorf("auth file %s: %w", f, err)
	}
	// Candidates from most to least specific: registry/a/b/c, registry/a/b, ..., registry.
	target := r.String()
	reg := r.RegistryStr()
	if repo, ok := r.(interface{ RepositoryStr() string }); ok {
		target = reg + "/" + repo.RepositoryStr()
	}
	for cand := target; ; {
		for key, e := range file.Auths {
			if normalizeAuthKey(key) != cand {
				continue
			}
			cfg := authn.AuthConfig{Username: e.Username, Password: e.Password, IdentityToken: e.IdentityToken}
			if e.Auth != "" {
				dec, err := base64.StdEncoding.DecodeString(e.Auth)
				if err != nil {
					return nil, fmt.Errorf("auth file %s: entry %q: %w", f, key, err)
				}
				u, p, ok := strings.Cut(string(dec), ":")
				if !ok {
					return nil, fmt.Errorf("auth file %s: entry %q: auth is not USER:PASS", f, key)
				}
				cfg.Username, cfg.Password = u, p
			}
			return authn.FromConfig(cfg), nil
		}
		i := strings.LastIndexByte(cand, '/')
		if i < 0 {
			break
		}
		cand = cand[:i]
	}
	if reg == dockerHub {
		// Docker Hub is also spelled docker.io in auth files.
		return authFile(f).Resolve(dockerIO{r})
	}
	return authn.Anonymous, nil
}

// normalizeAuthKey drops a scheme and a trailing slash or /v1/ path from an
// auth file key ("https://index.docker.io/v1/" → "index.docker.io").
func normalizeAuthKey(k string) string {
	if i := strings.Index(k, "://"); i >= 0 {
		k = k[i+3:]
	}
	k = strings.TrimSuffix(k, "/")
	k = strings.TrimSuffix(k, "/v1")
	return k
}

const dockerHub = "index.docker.io"

// dockerIO presents a Docker Hub resource as docker.io.
type dockerIO struct{ authn.Resource }

func (d dockerIO) RegistryStr() string { return "docker.io" }
func (d dockerIO) String() string {
	return "docker.io" + strings.TrimPrefix(d.Resource.String(), dockerHub)
}
