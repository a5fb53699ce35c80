package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/stargz-mount/stargz-mount/fetcher"
	"github.com/stargz-mount/stargz-mount/lru"
	"github.com/stargz-mount/stargz-mount/mount"
	"github.com/stargz-mount/stargz-mount/reader"
	"github.com/stargz-mount/stargz-mount/unpack"
)

// Layer annotations of the zstd:chunked format: containers/storage (podman,
// buildah) writes the io.github.containers names, the estargz library's
// zstdchunked writer the io.containers ones.
var (
	zstdChunkedChecksumAnnotations = []string{"io.github.containers.zstd-chunked.manifest-checksum", "io.containers.zstd-chunked.manifest-checksum"}
	zstdChunkedPositionAnnotations = []string{"io.github.containers.zstd-chunked.manifest-position", "io.containers.zstd-chunked.manifest-position"}
)

// annotation returns the first of keys that l has.
func annotation(l fetcher.Layer, keys []string) string {
	for _, k := range keys {
		if v := l.Annotations[k]; v != "" {
			return v
		}
	}
	return ""
}

// compression is how a layer blob's tar is compressed.
type compression int

const (
	compressionNone compression = iota
	compressionGzip
	compressionZstd
)

func (c compression) String() string {
	return [...]string{"uncompressed", "gzip", "zstd"}[c]
}

// decompressor returns the unpack.Decompressor for c.
func (c compression) decompressor() unpack.Decompressor {
	switch c {
	case compressionGzip:
		return func(r io.Reader) (io.ReadCloser, error) { return gzip.NewReader(r) }
	case compressionZstd:
		return func(r io.Reader) (io.ReadCloser, error) {
			d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<30))
			if err != nil {
				return nil, err
			}
			return d.IOReadCloser(), nil
		}
	}
	return func(r io.Reader) (io.ReadCloser, error) { return io.NopCloser(r), nil }
}

// layerFormat is what a layer descriptor says about how to mount the layer.
type layerFormat struct {
	compression compression
	estargz     bool // a TOC digest annotation: mount lazily
	zstdChunked bool // zstd:chunked annotations
}

// String names how a mount uses the layer.
func (f layerFormat) String() string {
	switch {
	case f.estargz:
		return "estargz"
	case f.zstdChunked:
		return "zstd:chunked"
	}
	return f.compression.String()
}

// ErrUnsupportedLayer is a layer stargz-mount cannot mount at all.
var ErrUnsupportedLayer = errors.New("unsupported layer")

// formatOf classifies a layer by media type and annotations.
func formatOf(i int, l fetcher.Layer) (layerFormat, error) {
	mt := string(l.MediaType)
	unsupported := func(why string) (layerFormat, error) {
		return layerFormat{}, fmt.Errorf("layer %d (%s) has media type %s: %s: %w", i, l.Digest, mt, why, ErrUnsupportedLayer)
	}
	switch {
	case strings.HasSuffix(mt, "+encrypted"):
		return unsupported("encrypted layers (ocicrypt) cannot be mounted; decrypt the image first (e.g. `skopeo copy --decryption-key`)")
	case strings.Contains(mt, ".foreign.") || strings.Contains(mt, ".nondistributable."):
		return unsupported("foreign (non-distributable) layers are not served by the registry and cannot be mounted")
	}
	var f layerFormat
	switch mt {
	case "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip":
		f.compression = compressionGzip
		f.estargz = l.Annotations[estargz.TOCJSONDigestAnnotation] != ""
	case "application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.docker.image.rootfs.diff.tar.zstd":
		f.compression = compressionZstd
		f.zstdChunked = annotation(l, zstdChunkedChecksumAnnotations) != "" && annotation(l, zstdChunkedPositionAnnotations) != ""
	case "application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar":
		f.compression = compressionNone
	default:
		return unsupported("unknown layer media type (want an OCI or Docker tar, tar+gzip or tar+zstd layer)")
	}
	return f, nil
}

// layerOpener opens the layers of one image for mounting.
type layerOpener struct {
	img        *fetcher.Image
	blobs      []*fetcher.Blob // one per layer, kept for their counters
	cache      *reader.Cache
	store      *unpack.Store
	skipVerify bool
	logger     *slog.Logger
	opened     func()          // called as each layer is ready
	extra      []reader.Option // for every lazily served layer

	prog    *progress    // shows plain-layer downloads; nil: none
	fetched atomic.Int64 // bytes of plain layers downloaded so far

	downloads chan struct{} // bounds concurrent plain-layer downloads; made by open

	mu    sync.Mutex // guards holds
	holds []func()   // releases the unpacked layers this mount uses

	bareWarned sync.Map // layer digests told not mounted lazily for want of a TOC digest
}

// release lets go of the unpacked layers, for when the mount is gone.
func (o *layerOpener) release() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, r := range o.holds {
		r()
	}
	o.holds = nil
}

// enforceBound prunes unpacked layers no live mount holds, least recently
// used first, so that they and the chunk store (chunks, nil when off)
// together use at most bound bytes. bound <= 0 means no bound.
func (o *layerOpener) enforceBound(chunks *lru.Store, bound int64) {
	if bound <= 0 {
		return
	}
	var other int64
	if chunks != nil {
		other, _ = chunks.Usage()
	}
	freed, err := o.store.Prune(max(0, bound-other))
	if err != nil {
		o.logger.Warn("pruning unpacked layers", "err", err)
	}
	if freed > 0 {
		o.logger.Info("pruned unpacked layers", "freed", freed)
	}
	if used, _ := o.store.Usage(); used+other > bound {
		o.logger.Warn("unpacked layers of live mounts exceed --cache-max-disk", "unpacked", used, "chunks", other, "max", bound)
	}
}

// cachedUsage is f's result, asked for at most once per every (or after
// invalidate): the chunk store asks at every write (lru.WithExternalUsage),
// and summing the unpacked layers takes a scan and a lock probe per layer.
// Until f first succeeds, and when it fails, it is the last good value.
type cachedUsage struct {
	f     func() (int64, error)
	every time.Duration

	mu sync.Mutex // guards n and at
	n  int64
	at time.Time // when n was taken; zero: ask f
}

func (u *cachedUsage) get() int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.at.IsZero() || time.Since(u.at) >= u.every {
		if n, err := u.f(); err == nil {
			u.n = n
		}
		u.at = time.Now()
	}
	return u.n
}

// invalidate makes the next get ask f.
func (u *cachedUsage) invalidate() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.at = time.Time{}
}

// maxDownloads bounds the plain layers fetched at once, so that whole-blob
// streams leave the fetcher's per-host request slots to lazy layers.
const maxDownloads = 3

// open makes every layer ready, all in parallel: eStargz layers become
// lazily served FUSE layers; plain layers are fetched, verified and
// unpacked into the store (or found there).
func (o *layerOpener) open(ctx context.Context) ([]mount.Lower, error) {
	formats := make([]layerFormat, len(o.img.Layers))
	for i, l := range o.img.Layers {
		f, err := formatOf(i, l)
		if err != nil {
			return nil, err
		}
		formats[i] = f
	}
	lowers := make([]mount.Lower, len(o.img.Layers))
	o.downloads = make(chan struct{}, maxDownloads)
	// A bar for the plain layers to download, if any: they take the time.
	var download int64
	for i, l := range o.img.Layers {
		if f := formats[i]; f.estargz || f.zstdChunked || (f.compression == compressionGzip && o.skipVerify) {
			continue
		}
		if p, err := o.store.Path(l.Digest.String()); err == nil {
			if _, err := os.Stat(p); err == nil {
				continue
			}
		}
		download += l.Size
	}
	if download > 0 {
		o.prog.bytes("plain layers", download, o.fetched.Load)
	}
	g, ctx := errgroup.WithContext(ctx)
	for i, l := range o.img.Layers {
		f := formats[i]
		g.Go(func() error {
			lower, err := o.openOne(ctx, i, l, f)
			if err != nil {
				return err
			}
			lowers[i] = lower
			if o.opened != nil {
				o.opened()
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return lowers, nil
}

func (o *layerOpener) openOne(ctx context.Context, i int, l fetcher.Layer, f layerFormat) (mount.Lower, error) {
	lazy := f.estargz || (f.compression == compressionGzip && o.skipVerify)
	if lazy {
		rl, err := o.openEStargz(ctx, i, l)
		switch {
		case err == nil:
			return mount.Lower{Layer: rl}, nil
		case errors.Is(err, reader.ErrNotEStargz) && !f.estargz:
			// A plain gzip layer: unpack it below.
		case errors.Is(err, reader.ErrNotEStargz):
			// Annotated but no eStargz footer (an external TOC, say): it is
			// still a gzip tar, checked against its blob digest when unpacked.
			o.logger.Warn("layer has a TOC digest annotation but no eStargz footer; unpacking it whole", "layer", l.Digest, "err", err)
		default:
			return mount.Lower{}, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	if f.zstdChunked {
		rl, err := reader.OpenZstdChunked(ctx, o.blobs[i],
			digest.Digest(annotation(l, zstdChunkedChecksumAnnotations)), annotation(l, zstdChunkedPositionAnnotations),
			o.readerOptions(l)...)
		if err == nil {
			return mount.Lower{Layer: rl}, nil
		}
		if ctx.Err() != nil {
			return mount.Lower{}, fmt.Errorf("layer %d: %w", i, err)
		}
		// Unpacking checks the whole blob against its digest, so a layer
		// whose TOC cannot be used lazily is still safe to use.
		o.logger.Warn("zstd:chunked layer cannot be served lazily; unpacking it whole", "layer", l.Digest, "err", err)
	}
	dir, err := o.unpack(ctx, l, f.compression)
	if err != nil {
		return mount.Lower{}, fmt.Errorf("layer %d (%s, %s): %w", i, l.Digest, f.compression, err)
	}
	if f.compression == compressionGzip && !f.estargz && !o.skipVerify && unpackedEStargz(dir) {
		if _, dup := o.bareWarned.LoadOrStore(l.Digest, true); !dup {
			o.logger.Warn("eStargz layer without a TOC digest annotation ("+estargz.TOCJSONDigestAnnotation+
				") is not mounted lazily, as its TOC cannot be verified: it is used unpacked, fetched whole and checked against its layer digest. "+
				"To mount it lazily, push the image with the annotation (`ctr-remote image optimize` and `nerdctl image convert --estargz` write it), "+
				"or pass --insecure-skip-verify to serve it lazily, unverified",
				"layer", l.Digest, "index", i)
		}
	}
	return mount.Lower{Dir: dir}, nil
}

// unpackedEStargz reports whether the unpacked layer in dir was an eStargz
// blob: its TOC is a tar entry too, so unpacking leaves it at the root.
// Looking costs no request, and works as well for a layer an earlier
// mount unpacked.
func unpackedEStargz(dir string) bool {
	fi, err := os.Lstat(filepath.Join(dir, estargz.TOCTarName))
	return err == nil && fi.Mode().IsRegular()
}

func (o *layerOpener) readerOptions(l fetcher.Layer) []reader.Option {
	return append([]reader.Option{
		reader.WithName(l.Digest.String()),
		reader.WithCache(o.cache),
		reader.WithInsecureSkipVerify(o.skipVerify),
		reader.WithLogger(o.logger),
	}, o.extra...)
}

func (o *layerOpener) openEStargz(ctx context.Context, i int, l fetcher.Layer) (*reader.Layer, error) {
	opts := o.readerOptions(l)
	if d := l.Annotations[estargz.TOCJSONDigestAnnotation]; d != "" {
		opts = append(opts, reader.WithTOCDigest(digest.Digest(d)))
	}
	return reader.Open(ctx, o.blobs[i], opts...)
}

// unpack returns the store directory of plain layer l, fetching and
// unpacking it if no earlier mount did.
func (o *layerOpener) unpack(ctx context.Context, l fetcher.Layer, c compression) (string, error) {
	// Held before it is looked up, so no prune removes it in between.
	release, err := o.store.Hold(l.Digest.String())
	if err != nil {
		return "", err
	}
	o.mu.Lock()
	o.holds = append(o.holds, release)
	o.mu.Unlock()
	open := func(ctx context.Context) (io.ReadCloser, error) {
		select {
		case o.downloads <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		o.logger.Info("fetching plain layer", "layer", l.Digest, "size", l.Size, "compression", c.String())
		rc, err := o.img.Blob(l).Open(ctx)
		if err != nil {
			<-o.downloads
			return nil, err
		}
		return &releaseCloser{&countingReader{rc, &o.fetched}, func() { <-o.downloads }}, nil
	}
	return o.store.Layer(ctx, l.Digest.String(), open, c.decompressor())
}

// releaseCloser calls release once, after closing the stream.
type releaseCloser struct {
	io.ReadCloser
	release func()
}

func (r *releaseCloser) Close() error {
	err := r.ReadCloser.Close()
	if r.release != nil {
		r.release()
		r.release = nil
	}
	return err
}

// countingReader adds the bytes read to n.
type countingReader struct {
	io.ReadCloser
	n *atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	k, err := c.ReadCloser.Read(b)
	c.n.Add(int64(k))
	return k, err
}
