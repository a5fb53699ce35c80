package fetcher

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// MetadataStore keeps what Resolve fetched (manifests and configs by
// digest, and the manifest digest each reference last resolved to), so
// that a cached image resolves with its registry down. Keys are
// "meta/NAME". lru.Store is one.
type MetadataStore interface {
	Get(key string) ([]byte, bool)
	Put(key string, b []byte) error
}

// WithMetadataStore caches resolved metadata in s. A reference by digest
// whose manifest and config are in s resolves without the registry; a tag
// whose registry is unreachable resolves to the digest it last resolved
// to, with a warning. The default is no cache.
func WithMetadataStore(s MetadataStore) Option { return func(o *options) { o.meta = s } }

// resolved is what the store keeps for a reference.
type resolved struct {
	Digest   string    `json:"digest"`
	Resolved time.Time `json:"resolved"`
}

func refKey(r name.Reference, p *v1.Platform) string {
	h := sha256.Sum256([]byte(r.String() + "|" + platformString(p)))
	return "meta/ref-" + hex.EncodeToString(h[:])
}

func blobKey(kind string, d v1.Hash) string { return "meta/" + kind + "-" + d.String() }

// remember stores an image's manifest and config and what r resolved to.
func remember(s MetadataStore, r name.Reference, p *v1.Platform, dgst v1.Hash, rawManifest, rawConfig []byte, cfgDigest v1.Hash) {
	s.Put(blobKey("manifest", dgst), rawManifest)
	s.Put(blobKey("config", cfgDigest), rawConfig)
	b, _ := json.Marshal(resolved{Digest: dgst.String(), Resolved: time.Now().UTC()})
	// A tag moves: its entry is replaced, not kept like content is.
	if rs, ok := s.(interface{ Remove(string) error }); ok {
		rs.Remove(refKey(r, p))
	}
	s.Put(refKey(r, p), b)
}

// recall returns the manifest and config r last resolved to, checked
// against their digests, or ok=false.
func recall(s MetadataStore, r name.Reference, p *v1.Platform) (res resolved, m *v1.Manifest, cfg *v1.ConfigFile, ok bool) {
	if b, ok := s.Get(refKey(r, p)); !ok || json.Unmarshal(b, &res) != nil {
		// A digest never resolved as such may still name a manifest
		// that was cached when its tag was resolved.
		d, byDigest := r.(name.Digest)
		if !byDigest {
			return res, nil, nil, false
		}
		res = resolved{Digest: d.DigestStr()}
	}
	d, err := v1.NewHash(res.Digest)
	if err != nil {
		return res, nil, nil, false
	}
	raw, ok := getVerified(s, blobKey("manifest", d), d)
	if !ok {
		return res, nil, nil, false
	}
	if m, err = v1.ParseManifest(bytes.NewReader(raw)); err != nil {
		return res, nil, nil, false
	}
	raw, ok = getVerified(s, blobKey("config", m.Config.Digest), m.Config.Digest)
	if !ok {
		return res, nil, nil, false
	}
	if cfg, err = v1.ParseConfigFile(bytes.NewReader(raw)); err != nil {
		return res, nil, nil, false
	}
	return res, m, cfg, true
}

func getVerified(s MetadataStore, key string, d v1.Hash) ([]byte, bool) {
	b, ok := s.Get(key)
	if !ok || d.Algorithm != "sha256" {
		return nil, false
	}
	sum := sha256.Sum256(b)
	return b, hex.EncodeToString(sum[:]) == d.Hex
}

// lazyTransport authenticates with the registry on the first request, so
// that an image resolved from the metadata cache makes no request until a
// blob read needs one.
type lazyTransport struct {
	repo     name.Repository
	keychain authn.Keychain
	base     http.RoundTripper

	mu sync.Mutex // guards rt
	rt http.RoundTripper
}

func (l *lazyTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	rt, err := l.get(req.Context())
	if err != nil {
		return nil, err
	}
	return rt.RoundTrip(req)
}

func (l *lazyTransport) get(ctx context.Context) (http.RoundTripper, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rt != nil {
		return l.rt, nil
	}
	auth, err := l.keychain.Resolve(l.repo)
	if err != nil {
		return nil, fmt.Errorf("resolve credentials: %w", err)
	}
	rt, err := transport.NewWithContext(ctx, l.repo.Registry, auth, l.base, []string{l.repo.Scope(transport.PullScope)})
	if err != nil {
		return nil, err
	}
	l.rt = rt
	return rt, nil
}
