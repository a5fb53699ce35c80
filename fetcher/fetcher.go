// Package fetcher resolves image references in OCI registries and reads
// blobs from them with HTTP range requests.
//
// It knows nothing about eStargz or FUSE: Resolve turns a reference into a
// manifest, a config and a list of layer descriptors, and Image.Blob gives an
// io.ReaderAt over one layer blob whose reads become Range requests.
package fetcher

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Option configures Resolve.
type Option func(*options)

type options struct {
	platform      *v1.Platform
	lazyConfig    bool
	plainHTTP     bool
	skipTLSVerify bool
	keychain      authn.Keychain
	caFile        string
	mirrors       []mirror
	transport     http.RoundTripper
	logger        *slog.Logger
	fetchTimeout  time.Duration
	stallTimeout  time.Duration
	maxConcurrent int
	meta          MetadataStore
	goarch        string // the host's architecture (runtime.GOARCH; tests set others)
}

type mirror struct{ registry, mirror string }

// WithCAFile trusts the PEM certificates in file besides the system roots.
func WithCAFile(file string) Option { return func(o *options) { o.caFile = file } }

// WithMirror makes references to registry (e.g. "docker.io") resolve
// through mirror (host[:port]) first, and through the origin if the mirror
// fails. Mirrors of one registry are tried in the order given. The blobs
// come from where the manifest came from.
func WithMirror(registry, host string) Option {
	return func(o *options) {
		if reg, err := name.NewRegistry(registry); err == nil {
			registry = reg.RegistryStr()
		}
		o.mirrors = append(o.mirrors, mirror{registry, host})
	}
}

// Defaults of the blob read options.
const (
	DefaultFetchTimeout         = 30 * time.Second
	DefaultStallTimeout         = 10 * time.Second
	DefaultMaxConcurrentFetches = 8
)

// WithLazyConfig lets Resolve return once it has the manifest, fetching the
// config meanwhile: Image.Config and Image.Platform are then set by
// Image.WaitConfig, which every caller must call before using them. (With
// WithPlatform and a single-platform image, the config is fetched before
// Resolve returns, to check the platform.) The default is to fetch it
// before Resolve returns.
func WithLazyConfig() Option { return func(o *options) { o.lazyConfig = true } }

// WithPlatform selects the image for platform p ("os/arch[/variant]") from an
// index. The default is the host's platform.
func WithPlatform(p *v1.Platform) Option { return func(o *options) { o.platform = p } }

// WithPlainHTTP makes every registry speak plain HTTP. Registries on
// localhost, 127.0.0.0/8 and ::1 always do.
func WithPlainHTTP(b bool) Option { return func(o *options) { o.plainHTTP = b } }

// WithInsecureSkipTLSVerify accepts any TLS certificate. Off by default.
func WithInsecureSkipTLSVerify(b bool) Option { return func(o *options) { o.skipTLSVerify = b } }

// WithKeychain sets where credentials come from. The default is
// Keychain("", ""): podman auth files and the Docker config.
func WithKeychain(k authn.Keychain) Option { return func(o *options) { o.keychain = k } }

// WithTransport sets the base HTTP transport, under authentication. The
// default is a clone of http.DefaultTransport.
func WithTransport(t http.RoundTripper) Option { return func(o *options) { o.transport = t } }

// WithLogger sets the logger for retries and the like. The default is
// slog.Default().
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithFetchTimeout bounds one blob read, retries included: past it the
// read fails with the last cause. Default DefaultFetchTimeout (30s).
func WithFetchTimeout(d time.Duration) Option { return func(o *options) { o.fetchTimeout = d } }

// WithStallTimeout cancels and retries a request that receives no data for
// d. Default DefaultStallTimeout (10s), and never more than a third of the
// fetch timeout.
func WithStallTimeout(d time.Duration) Option { return func(o *options) { o.stallTimeout = d } }

// WithMaxConcurrentFetches bounds the blob requests in flight to one host.
// Default DefaultMaxConcurrentFetches (8).
func WithMaxConcurrentFetches(n int) Option { return func(o *options) { o.maxConcurrent = n } }

// ParsePlatform parses "os/arch[/variant]".
func ParsePlatform(s string) (*v1.Platform, error) {
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return nil, fmt.Errorf("platform %q: want os/arch[/variant], e.g. linux/amd64 or linux/arm/v7", s)
	}
	p := &v1.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

// Image is a resolved image: its manifest digest, config and layers, and the
// means to read its blobs.
type Image struct {
	Ref      name.Reference // the reference as parsed
	Digest   v1.Hash        // digest of the image manifest
	Platform v1.Platform    // the platform the config declares; with WithLazyConfig, after WaitConfig
	Manifest *v1.Manifest
	Config   *v1.ConfigFile // with WithLazyConfig, set by WaitConfig
	Layers   []Layer        // bottom first

	config *configFetch // with WithLazyConfig, until WaitConfig

	repo         name.Repository
	scheme       string
	client       *http.Client
	logger       *slog.Logger
	fetchTimeout time.Duration
	stallTimeout time.Duration
	limits       *hostLimits
}

// configFetch is an image config on its way.
type configFetch struct {
	done chan struct{}
	cfg  *v1.ConfigFile
	err  error
}

// WaitConfig waits for the config fetch WithLazyConfig left running and
// sets Config and Platform, or returns its error (the error Resolve would
// have returned). Without WithLazyConfig it returns nil at once.
func (im *Image) WaitConfig(ctx context.Context) error {
	f := im.config
	if f == nil {
		return nil
	}
	select {
	case <-f.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if f.err != nil {
		return f.err
	}
	im.setConfig(f.cfg)
	im.config = nil
	return nil
}

// Layer describes one layer blob of an image.
type Layer struct {
	Digest      v1.Hash
	MediaType   types.MediaType
	Size        int64
	Annotations map[string]string
}

// Resolve parses ref, fetches its manifest (picking the platform from an
// index) and its config.
func Resolve(ctx context.Context, ref string, opts ...Option) (*Image, error) {
	o := options{keychain: Keychain("", ""), logger: slog.Default(), fetchTimeout: DefaultFetchTimeout,
		stallTimeout: DefaultStallTimeout, maxConcurrent: DefaultMaxConcurrentFetches, goarch: hostArch()}
	for _, opt := range opts {
		opt(&o)
	}
	if o.fetchTimeout <= 0 {
		o.fetchTimeout = DefaultFetchTimeout
	}
	if o.stallTimeout <= 0 || o.stallTimeout > o.fetchTimeout/3 {
		o.stallTimeout = min(DefaultStallTimeout, o.fetchTimeout/3)
	}
	if o.maxConcurrent <= 0 {
		o.maxConcurrent = DefaultMaxConcurrentFetches
	}
	var nopts []name.Option
	if o.plainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	r, err := name.ParseReference(ref, nopts...)
	if err != nil {
		return nil, &Error{Op: "parse reference", Ref: ref, Kind: KindBadReference, Err: err}
	}

	base := o.transport
	if base == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = 32
		tc := &tls.Config{}
		if o.skipTLSVerify {
			tc.InsecureSkipVerify = true //nolint:gosec // the user asked for it
		}
		if o.caFile != "" {
			pool, err := caPool(o.caFile)
			if err != nil {
				return nil, &Error{Op: "load CA file", Ref: o.caFile, Kind: KindOther, Err: err}
			}
			tc.RootCAs = pool
		}
		t.TLSClientConfig = tc
		base = t
	}
	for _, m := range o.mirrors {
		if m.registry != r.Context().RegistryStr() {
			continue
		}
		mr, err := onRegistry(r, m.mirror, nopts)
		if err != nil {
			return nil, &Error{Op: "parse mirror", Ref: m.mirror, Kind: KindBadReference, Err: err}
		}
		im, err := resolve(ctx, mr, base, &o)
		if err == nil {
			im.Ref = r
			o.logger.Debug("resolved through mirror", "ref", r, "mirror", m.mirror)
			return im, nil
		}
		o.logger.Warn("mirror failed; trying the next, then the origin", "ref", r, "mirror", m.mirror, "err", err)
	}
	return resolve(ctx, r, base, &o)
}

// onRegistry is reference r on another registry host.
func onRegistry(r name.Reference, host string, nopts []name.Option) (name.Reference, error) {
	reg, err := name.NewRegistry(host, nopts...)
	if err != nil {
		return nil, err
	}
	repo := reg.Repo(r.Context().RepositoryStr())
	if d, ok := r.(name.Digest); ok {
		return repo.Digest(d.DigestStr()), nil
	}
	return repo.Tag(r.Identifier()), nil
}

func caPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	return pool, nil
}

func resolve(ctx context.Context, r name.Reference, base http.RoundTripper, o *options) (*Image, error) {
	platform := o.platform
	if platform == nil {
		platform = hostPlatform(o.goarch)
	}

	im := &Image{
		Ref:    r,
		repo:   r.Context(),
		scheme: scheme(r.Context().Registry, o.plainHTTP),
		logger: o.logger,

		fetchTimeout: o.fetchTimeout,
		stallTimeout: o.stallTimeout,
		limits:       &hostLimits{n: o.maxConcurrent},
	}
	lazy := &lazyTransport{repo: r.Context(), keychain: o.keychain, base: base}
	im.client = &http.Client{Transport: lazy}

	// By digest, a cached manifest is as good as the registry's.
	if _, byDigest := r.(name.Digest); byDigest && o.meta != nil {
		if res, m, cfg, ok := recall(o.meta, r, platform); ok {
			o.logger.Debug("resolved from the metadata cache", "ref", r.String(), "digest", res.Digest)
			return im.fill(res.Digest, m, cfg)
		}
	}
	// Authenticate for blob reads while the manifest is fetched: it is
	// a round trip or two of its own (ping, token).
	authed := make(chan error, 1)
	go func() {
		_, err := lazy.get(ctx)
		authed <- err
	}()
	m, config, dgst, err := resolveRemote(ctx, r, platform, o, base)
	if err != nil {
		var fe *Error
		if _, byTag := r.(name.Tag); byTag && o.meta != nil && errors.As(err, &fe) && fe.Kind == KindUnreachable {
			if res, m, cfg, ok := recall(o.meta, r, platform); ok {
				o.logger.Warn("registry unreachable: using the digest this tag resolved to before",
					"ref", r.String(), "digest", res.Digest, "resolved", res.Resolved.Format(time.RFC3339), "err", err)
				return im.fill(res.Digest, m, cfg)
			}
		}
		return nil, err
	}

	// A denied pull fails here, not at the first read.
	if err := <-authed; err != nil {
		return nil, classify("authenticate", r.String(), err)
	}
	if o.lazyConfig && config.cfg == nil && config.err == nil {
		im.config = &configFetch{done: make(chan struct{})}
		go func() {
			defer close(im.config.done)
			im.config.cfg, im.config.err = config.get()
		}()
		return im.fill(dgst.String(), m, nil)
	}
	cfg, err := config.get()
	if err != nil {
		return nil, err
	}
	return im.fill(dgst.String(), m, cfg)
}

// remoteConfig fetches an image's config once, remembering manifest and
// config in the metadata cache.
type remoteConfig struct {
	once sync.Once
	get0 func() (*v1.ConfigFile, error)
	cfg  *v1.ConfigFile
	err  error
}

func (c *remoteConfig) get() (*v1.ConfigFile, error) {
	c.once.Do(func() { c.cfg, c.err = c.get0() })
	return c.cfg, c.err
}

// resolveRemote fetches r's manifest (picking the platform from an index)
// from the registry, and returns it with the means to fetch its config,
// which remembers both in o.meta.
func resolveRemote(ctx context.Context, r name.Reference, platform *v1.Platform, o *options, base http.RoundTripper) (*v1.Manifest, *remoteConfig, v1.Hash, error) {
	var none v1.Hash
	desc, err := getManifest(ctx, r, platform, o, base)
	if err != nil {
		return nil, nil, none, classify("fetch manifest", r.String(), err)
	}
	img, err := pickImage(desc, platform)
	if err != nil {
		return nil, nil, none, classify(fmt.Sprintf("pick %s", platformString(platform)), r.String(), err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, nil, none, classify("read manifest", r.String(), err)
	}
	dgst, err := img.Digest()
	if err != nil {
		return nil, nil, none, classify("digest manifest", r.String(), err)
	}
	config := &remoteConfig{get0: func() (*v1.ConfigFile, error) {
		cfg, err := img.ConfigFile()
		if err != nil {
			return nil, classify("fetch config", r.String(), err)
		}
		if o.meta != nil {
			rawM, err1 := img.RawManifest()
			rawC, err2 := img.RawConfigFile()
			if err1 == nil && err2 == nil {
				remember(o.meta, r, platform, dgst, rawM, rawC, m.Config.Digest)
			}
		}
		return cfg, nil
	}}
	if o.platform != nil && !desc.MediaType.IsIndex() {
		// The config says which platform a single image is for.
		cfg, err := config.get()
		if err != nil {
			return nil, nil, none, err
		}
		if !platformMatches(cfg, o.platform) {
			return nil, nil, none, &Error{Op: "select platform", Ref: r.String(), Kind: KindNotFound,
				Err: fmt.Errorf("the image is %s/%s, not %s", cfg.OS, cfg.Architecture, platformString(o.platform))}
		}
	}
	return m, config, dgst, nil
}

// getManifest fetches r's manifest or index the way go-containerregistry
// does (a ping for the registry's authentication challenge, a token if it
// wants one, then the manifest) and, at the same time, asks for it
// anonymously without the ping: a registry that serves anonymous pulls
// answers that in one round trip instead of two. One that wants
// credentials answers it 401, which costs nothing but the request. Where
// the user has credentials for the registry, nothing is asked
// anonymously: they may count differently (rate limits, audit logs).
func getManifest(ctx context.Context, r name.Reference, platform *v1.Platform, o *options, base http.RoundTripper) (*remote.Descriptor, error) {
	type got struct {
		desc *remote.Descriptor
		err  error
	}
	// The authenticated path is not cancelled when the anonymous one wins:
	// cancelling its ping while the blob transport's ping to the same
	// host was under way failed that one too (seen once in CI as
	// "authenticate: ... context canceled"). It costs one request.
	slow := make(chan got, 1)
	go func() {
		d, err := remote.Get(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(o.keychain),
			remote.WithTransport(base), remote.WithPlatform(*platform))
		slow <- got{d, err}
	}()
	var fast chan got
	// Only where go-containerregistry's URL scheme is the one this
	// package uses (not, say, plain HTTP to a private address that the
	// ping would have found speaking HTTPS).
	if reg := r.Context().Registry; reg.Scheme() == scheme(reg, o.plainHTTP) {
		anon, err := transport.FromToken(reg, authn.Anonymous, transport.NewUserAgent(base, ""),
			&transport.Challenge{Scheme: "anonymous"}, &transport.Token{})
		if err == nil {
			fast = make(chan got, 1)
			go func() {
				if a, err := o.keychain.Resolve(r.Context()); err != nil || a != authn.Anonymous {
					fast <- got{err: errors.New("credentials configured: not asking anonymously")}
					return
				}
				d, err := remote.Get(r, remote.WithContext(ctx), remote.WithTransport(anon), remote.WithPlatform(*platform))
				fast <- got{d, err}
			}()
		}
	}
	for {
		select {
		case g := <-fast:
			if g.err == nil {
				return g.desc, nil
			}
			o.logger.Debug("anonymous manifest fetch failed; authenticating", "ref", r.String(), "err", g.err)
			fast = nil
		case g := <-slow:
			if g.err != nil && fast != nil {
				if f := <-fast; f.err == nil {
					return f.desc, nil
				}
			}
			return g.desc, g.err
		}
	}
}

// fill sets the image's manifest-derived fields.
func (im *Image) fill(dgst string, m *v1.Manifest, cfg *v1.ConfigFile) (*Image, error) {
	d, err := v1.NewHash(dgst)
	if err != nil {
		return nil, &Error{Op: "digest manifest", Ref: im.Ref.String(), Err: err}
	}
	im.Digest, im.Manifest = d, m
	if cfg != nil {
		im.setConfig(cfg)
	}
	for _, l := range m.Layers {
		im.Layers = append(im.Layers, Layer{
			Digest:      l.Digest,
			MediaType:   l.MediaType,
			Size:        l.Size,
			Annotations: l.Annotations,
		})
	}
	return im, nil
}

func (im *Image) setConfig(cfg *v1.ConfigFile) {
	im.Config = cfg
	im.Platform = v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant}
}

// scheme decides between http and https the way the tool documents it:
// plain HTTP for loopback registries or when asked, HTTPS otherwise.
func scheme(reg name.Registry, plainHTTP bool) string {
	if plainHTTP {
		return "http"
	}
	host := reg.RegistryStr()
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if host == "localhost" {
		return "http"
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return "http"
	}
	return "https"
}

// Kind says what went wrong, for callers that branch and for messages.
type Kind int

const (
	KindOther        Kind = iota
	KindBadReference      // the reference does not parse
	KindNotFound          // the repository, tag, manifest or blob does not exist
	KindUnauthorized      // credentials missing or rejected
	KindUnreachable       // no connection to the registry
	KindBadResponse       // the registry answered something we cannot use
	KindTransient         // a failure that may pass: 429, 5xx, a broken, short, stalled or mislabelled body
)

// Error is a registry operation that failed.
type Error struct {
	Op   string // what was being done, e.g. "fetch manifest"
	Ref  string // the image or blob
	Kind Kind
	Err  error
	// RetryAfter is what a 429 or 503 asked to wait, 0 if nothing.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	var what string
	switch e.Kind {
	case KindNotFound:
		what = "not found"
	case KindUnauthorized:
		what = "unauthorized: access denied (check --creds, or log in with `docker login` or `podman login`)"
	case KindUnreachable:
		what = "registry unreachable"
	case KindBadReference:
		what = "invalid image reference"
	}
	if what != "" {
		return fmt.Sprintf("%s %s: %s: %v", e.Op, e.Ref, what, short(e.Err))
	}
	return fmt.Sprintf("%s %s: %v", e.Op, e.Ref, short(e.Err))
}

func (e *Error) Unwrap() error { return e.Err }

// Retryable reports whether trying again later may succeed.
func (e *Error) Retryable() bool { return e.Kind == KindUnreachable || e.Kind == KindTransient }

// short trims go-containerregistry's verbose errors to their first line.
func short(err error) string {
	var te *transport.Error
	if errors.As(err, &te) {
		if len(te.Errors) > 0 {
			return fmt.Sprintf("%s (HTTP %d)", te.Errors[0].Message, te.StatusCode)
		}
		return fmt.Sprintf("HTTP %d", te.StatusCode)
	}
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func classify(op, ref string, err error) error {
	e := &Error{Op: op, Ref: ref, Kind: KindOther, Err: err}
	var te *transport.Error
	var ne net.Error
	var oe *net.OpError
	switch {
	case errors.As(err, &te):
		switch te.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			e.Kind = KindUnauthorized
		case http.StatusNotFound:
			e.Kind = KindNotFound
		default:
			for _, d := range te.Errors {
				switch d.Code {
				case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
					e.Kind = KindNotFound
				case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
					e.Kind = KindUnauthorized
				}
			}
		}
	case errors.As(err, &oe), errors.As(err, &ne):
		e.Kind = KindUnreachable
	case errors.Is(err, context.DeadlineExceeded):
		e.Kind = KindUnreachable
	}
	return e
}

func platformMatches(cfg *v1.ConfigFile, p *v1.Platform) bool {
	return platformMatch(v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant}, p)
}

// platformMatch reports whether an image for have runs on want: same OS
// and architecture, and the variant asked for, if any. As in containerd,
// arm64 without a variant is arm64/v8 (go-containerregistry's own matching
// would not pick a plain linux/arm64 entry for linux/arm64/v8).
func platformMatch(have v1.Platform, want *v1.Platform) bool {
	if have.OS != want.OS || have.Architecture != want.Architecture {
		return false
	}
	return want.Variant == "" || normVariant(have) == normVariant(*want)
}

func normVariant(p v1.Platform) string {
	if p.Architecture == "arm64" && p.Variant == "" {
		return "v8"
	}
	return p.Variant
}

// pickImage is desc.Image, picking from an index (nested ones too) the
// first image whose platform matches p by platformMatch.
func pickImage(desc *remote.Descriptor, p *v1.Platform) (v1.Image, error) {
	if !desc.MediaType.IsIndex() {
		return desc.Image()
	}
	idx, err := desc.ImageIndex()
	if err != nil {
		return nil, err
	}
	return pickFromIndex(idx, p, 0)
}

func pickFromIndex(idx v1.ImageIndex, p *v1.Platform, depth int) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var listed []string
	for _, c := range im.Manifests {
		// Without a platform, go-containerregistry takes an entry for linux/amd64.
		have := v1.Platform{OS: "linux", Architecture: "amd64"}
		if c.Platform != nil {
			have = *c.Platform
		}
		listed = append(listed, platformString(&have))
		if !platformMatch(have, p) {
			continue
		}
		if c.MediaType.IsIndex() {
			if depth >= 4 {
				return nil, errors.New("indexes nested more than 4 deep")
			}
			sub, err := idx.ImageIndex(c.Digest)
			if err != nil {
				return nil, err
			}
			return pickFromIndex(sub, p, depth+1)
		}
		return idx.Image(c.Digest)
	}
	return nil, fmt.Errorf("no image for %s in the index (it lists %s)", platformString(p), strings.Join(listed, ", "))
}

func platformString(p *v1.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}
