// Package reader serves the files of one eStargz layer: it reads the layer's
// footer and table of contents (TOC) through a Blob, builds an immutable
// tree of nodes from the TOC, and reads file data chunk by chunk on demand,
// verifying each chunk against its TOC digest and keeping decompressed
// chunks in a bounded memory cache.
//
// The tree is the layer as an overlayfs lower directory expects it: OCI
// whiteout files ".wh.NAME" appear as 0/0 character devices named NAME, a
// directory holding ".wh..wh..opq" carries the opaque xattr, and the
// eStargz bookkeeping entries (".prefetch.landmark", ".no.prefetch.landmark")
// do not appear. The package knows nothing of FUSE.
package reader

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
)

// Blob is a layer blob: random access to its compressed bytes.
type Blob interface {
	io.ReaderAt
	Size() int64
}

// Limits on what a TOC may ask of us. A layer beyond them is refused.
const (
	// MaxTOCBytes bounds the compressed TOC (and footer) read at open.
	MaxTOCBytes = 64 << 20
	// MaxTOCJSONBytes bounds the TOC once decompressed, so a small TOC
	// cannot expand into gigabytes (a gzip bomb).
	MaxTOCJSONBytes = 256 << 20
	// MaxEntries bounds the number of TOC entries.
	MaxEntries = 1 << 20
	// MaxDepth bounds the number of path components of an entry.
	MaxDepth = 256
	// MaxChunkSize bounds the decompressed size of one chunk.
	MaxChunkSize = 64 << 20
)

// ErrNoTOCDigest is returned when a layer has no TOC digest to verify
// against and verification was not switched off. Its text says how to
// proceed.
var ErrNoTOCDigest = errors.New("layer has no TOC digest to verify its TOC against: " +
	"push the image with the layer's TOC digest annotation (for eStargz, `ctr-remote image optimize` and " +
	"`nerdctl image convert --estargz` write it; for zstd:chunked, `podman push --compression-format zstd:chunked`), " +
	"or skip verification explicitly " +
	"(stargz-mount --insecure-skip-verify, WithInsecureSkipVerify)")

// ErrNotEStargz is returned for a blob without an eStargz footer.
var ErrNotEStargz = errors.New("not an eStargz layer: no eStargz footer")

// Option configures Open.
type Option func(*options)

type options struct {
	name        string
	tocDigest   digest.Digest
	skipVerify  bool
	cache       *Cache
	tailSize    int64
	opaqueXattr string
	logger      *slog.Logger
	demand      *Demand

	earlyPrefetch bool
}

// WithName names the layer in errors, logs and cache keys; use its digest.
// The default is "layer".
func WithName(n string) Option { return func(o *options) { o.name = n } }

// WithTOCDigest sets the digest the TOC must have (the layer's
// containerd.io/snapshot/stargz/toc.digest annotation). Open fails without
// one unless WithInsecureSkipVerify is given.
func WithTOCDigest(d digest.Digest) Option { return func(o *options) { o.tocDigest = d } }

// WithInsecureSkipVerify opens a layer without a TOC digest to check. Chunks
// whose TOC entry carries a digest are still verified.
func WithInsecureSkipVerify(b bool) Option { return func(o *options) { o.skipVerify = b } }

// WithCache shares a memory cache for decompressed chunks. The default is a
// private 64 MiB cache.
func WithCache(c *Cache) Option { return func(o *options) { o.cache = c } }

// WithTailSize sets how many bytes at the end of the blob the first request
// reads, hoping to get footer and TOC in one go. The default is 1 MiB.
func WithTailSize(n int64) Option { return func(o *options) { o.tailSize = n } }

// WithOpaqueXattr sets the xattr that marks opaque directories:
// "trusted.overlay.opaque" (the default) or "user.overlay.opaque" for an
// overlay mounted with userxattr.
func WithOpaqueXattr(name string) Option { return func(o *options) { o.opaqueXattr = name } }

// WithLogger sets the logger. The default is slog.Default().
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// Layer is an opened eStargz layer. It is safe for concurrent use.
type Layer struct {
	name      string
	blob      Blob
	cache     *Cache
	logger    *slog.Logger
	tocDigest digest.Digest
	tocOffset int64
	entries   int   // TOC entries, chunks included
	prefetch  int64 // bytes before the prefetch landmark, 0 if none
	root      *Node
	nodes     int
	fetches   fetchTable // chunk fetches in flight, recent failures, read-ahead state
	demand    *Demand    // on-demand fetches in flight; background work yields to them
	acct      accounting // stats.go
	rec       atomic.Pointer[recorder]
	zstd      bool // chunks are zstd frames (zstd:chunked), not gzip members

	earlyMu sync.Mutex // guards early
	early   *region    // the prioritized region fetched early (early.go), until Prefetch takes it
}

// Open reads the footer and TOC of the eStargz blob b and builds its tree.
// It makes one request when footer and TOC fit in the tail size, two
// otherwise.
func Open(ctx context.Context, b Blob, opts ...Option) (*Layer, error) {
	o := options{name: "layer", tailSize: 1 << 20, opaqueXattr: "trusted.overlay.opaque", logger: slog.Default()}
	for _, opt := range opts {
		opt(&o)
	}
	if o.cache == nil {
		o.cache = NewCache(64 << 20)
	}
	if o.demand == nil {
		o.demand = NewDemand()
	}
	size := b.Size()
	if size < estargz.FooterSize {
		return nil, fmt.Errorf("open %s: %w (blob of %d bytes)", o.name, ErrNotEStargz, size)
	}
	// With a Store, the TOC region (TOC and footer) is kept there, so a
	// layer opens without the registry; it is verified like a fetched one.
	store, tocKey := o.cache.store, o.name+"/toc"
	if store != nil {
		if t, ok := store.Get(tocKey); ok && int64(len(t)) >= estargz.FooterSize && int64(len(t)) <= size {
			l, _, err := openTail(ctx, b, &o, &tailBlob{Blob: b, off: size - int64(len(t)), tail: t}, false)
			if err == nil {
				return l, nil
			}
			o.logger.Warn("cached TOC unusable, fetching it again", "layer", o.name, "err", err)
		}
	}
	tb, err := readTail(ctx, b, min(size, max(o.tailSize, estargz.FooterSize)))
	if err != nil {
		return nil, fmt.Errorf("open %s: read footer: %w", o.name, err)
	}
	l, region, err := openTail(ctx, b, &o, tb, o.earlyPrefetch)
	if err == nil && store != nil {
		store.Put(tocKey, region)
	}
	return l, err
}

// openTail opens the layer whose tail (at least footer and TOC, or just the
// footer) is in tb, and returns it with its TOC region. With early, the
// prioritized region is fetched while the TOC is parsed.
func openTail(ctx context.Context, b Blob, o *options, tb *tailBlob, early bool) (*Layer, []byte, error) {
	size := b.Size()
	sr := io.NewSectionReader(tb, 0, size)
	tocOffset, err := openFooter(sr)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w (%v)", o.name, ErrNotEStargz, err)
	}
	if o.tocDigest == "" && !o.skipVerify {
		return nil, nil, fmt.Errorf("open %s: annotation %s is missing: %w", o.name, estargz.TOCJSONDigestAnnotation, ErrNoTOCDigest)
	}
	if tocOffset < 0 || tocOffset >= size {
		return nil, nil, fmt.Errorf("open %s: footer points at TOC offset %d outside the %d-byte blob", o.name, tocOffset, size)
	}
	if size-tocOffset > MaxTOCBytes {
		return nil, nil, fmt.Errorf("open %s: TOC of %d bytes exceeds the limit of %d", o.name, size-tocOffset, MaxTOCBytes)
	}
	if err := tb.extend(ctx, tocOffset); err != nil {
		return nil, nil, fmt.Errorf("open %s: read TOC: %w", o.name, err)
	}
	tocJSON, err := readTOCJSON(tb.tail[tocOffset-tb.off:])
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", o.name, err)
	}
	// The digest first: a TOC the manifest vouches for is parsed, no other.
	tocDigest := digest.FromBytes(tocJSON)
	if o.tocDigest != "" && tocDigest != o.tocDigest {
		return nil, nil, fmt.Errorf("open %s: TOC digest %s does not match the manifest's %s: refusing a tampered layer", o.name, tocDigest, o.tocDigest)
	}
	var er0 *region
	if early {
		if off := landmarkOffset(tocJSON); off > 0 && off <= tocOffset && off <= maxEarlyRegion {
			er0 = startRegion(b, 0, off)
		}
	}
	fail := func(err error) (*Layer, []byte, error) {
		if er0 != nil {
			er0.cancel()
		}
		return nil, nil, err
	}
	l := &Layer{
		name:      o.name,
		blob:      b,
		cache:     o.cache,
		logger:    o.logger,
		tocDigest: tocDigest,
		tocOffset: tocOffset,
		demand:    o.demand,
	}
	if err := l.buildTree(tocJSON, size, o.opaqueXattr, !o.skipVerify); err != nil {
		return fail(fmt.Errorf("open %s: %w", o.name, err))
	}
	if er0 != nil && l.prefetch != int64(len(er0.buf)) {
		er0.cancel() // the scan found another landmark than the tree
		er0 = nil
	}
	l.early = er0
	return l, tb.tail[tocOffset-tb.off:], nil
}

// Root is the layer's root directory.
func (l *Layer) Root() *Node { return l.root }

// Name is the name given with WithName.
func (l *Layer) Name() string { return l.name }

// TOCDigest is the digest of the layer's TOC JSON.
func (l *Layer) TOCDigest() digest.Digest { return l.tocDigest }

// Entries is the number of TOC entries the tree holds: files, directories,
// whiteouts and file chunks; hardlinks and landmarks are not counted.
func (l *Layer) Entries() int { return l.entries }

// Nodes is the number of nodes (inodes) in the tree.
func (l *Layer) Nodes() int { return l.nodes }

// PrefetchBytes is the number of blob bytes before the prefetch landmark:
// the prioritized files. It is 0 when the layer has no landmark.
func (l *Layer) PrefetchBytes() int64 { return l.prefetch }

// tailBlob serves reads of the blob's tail from memory, read in one request.
type tailBlob struct {
	Blob
	off  int64 // blob offset of tail[0]
	tail []byte
}

func readTail(ctx context.Context, b Blob, n int64) (*tailBlob, error) {
	t := &tailBlob{Blob: b, off: b.Size() - n, tail: make([]byte, n)}
	if err := readFull(ctx, b, t.tail, t.off); err != nil {
		return nil, err
	}
	return t, nil
}

// extend makes the tail start at off or earlier, with one more request.
func (t *tailBlob) extend(ctx context.Context, off int64) error {
	if off >= t.off {
		return nil
	}
	head := make([]byte, t.off-off)
	if err := readFull(ctx, t.Blob, head, off); err != nil {
		return err
	}
	t.tail = append(head, t.tail...)
	t.off = off
	return nil
}

func (t *tailBlob) ReadAt(p []byte, off int64) (int, error) {
	if off >= t.off && off+int64(len(p)) <= t.off+int64(len(t.tail)) {
		return copy(p, t.tail[off-t.off:]), nil
	}
	return t.Blob.ReadAt(p, off)
}

// contextReaderAt is implemented by blobs whose reads can be cancelled.
type contextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

func readFull(ctx context.Context, b Blob, p []byte, off int64) error {
	var n int
	var err error
	if cb, ok := b.(contextReaderAt); ok {
		n, err = cb.ReadAtContext(ctx, p, off)
	} else {
		n, err = b.ReadAt(p, off)
	}
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// readTOCJSON reads the TOC JSON from the TOC region (a gzip stream
// holding a tar with the TOC JSON, then the footer), reading no more than
// MaxTOCJSONBytes of it.
func readTOCJSON(region []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(region))
	if err != nil {
		return nil, fmt.Errorf("TOC is not gzip: %w", err)
	}
	defer zr.Close()
	lr := &io.LimitedReader{R: zr, N: MaxTOCJSONBytes + 1}
	tooBig := fmt.Errorf("TOC decompresses to more than the limit of %d bytes", MaxTOCJSONBytes)
	tr := tar.NewReader(lr)
	for {
		h, err := tr.Next()
		if err != nil {
			if lr.N <= 0 {
				return nil, tooBig
			}
			return nil, fmt.Errorf("TOC has no %s: %v", estargz.TOCTarName, err)
		}
		if h.Name != estargz.TOCTarName {
			continue
		}
		if h.Size > MaxTOCJSONBytes {
			return nil, tooBig
		}
		b := make([]byte, h.Size)
		if _, err := io.ReadFull(tr, b); err != nil {
			if lr.N <= 0 {
				return nil, tooBig
			}
			return nil, fmt.Errorf("read %s: %v", estargz.TOCTarName, err)
		}
		return b, nil
	}
}

// buildTree decodes TOC JSON into l's tree (tree.go), entry by entry,
// checking the limits: at most MaxEntries entries, and no file whose chunk
// list (sized by size/chunkSize) would exceed it. The form estargz writes
// is decoded in one pass (tocjson.go); any other JSON with encoding/json.
func (l *Layer) buildTree(tocJSON []byte, size int64, opaqueXattr string, verify bool) error {
	b := newTreeBuilder(l, size, opaqueXattr, verify)
	_, err := scanTOC(tocJSON, b.add)
	if err == errSlowPath {
		toc, err := parseTOCSlow(tocJSON)
		if err != nil {
			return err
		}
		b = newTreeBuilder(l, size, opaqueXattr, verify)
		for _, e := range toc.Entries {
			if err := b.add(e); err != nil {
				return err
			}
		}
	} else if err != nil {
		return fmt.Errorf("TOC JSON: %w", err)
	}
	return b.finish()
}

var errTooManyEntries = fmt.Errorf("TOC has more than the limit of %d entries", MaxEntries)

// parseTOCSlow is parseTOC with encoding/json, for any JSON.
func parseTOCSlow(b []byte) (*estargz.JTOC, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	bad := func(err error) error { return fmt.Errorf("TOC JSON: %w", err) }
	if err := expectDelim(dec, '{'); err != nil {
		return nil, bad(err)
	}
	toc := new(estargz.JTOC)
	seenEntries := false
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, bad(err)
		}
		// As encoding/json (the estargz library's decoder) reads it:
		// keys match without case, and a repeated key's last value wins.
		key, _ := t.(string)
		switch {
		case strings.EqualFold(key, "version"):
			err = dec.Decode(&toc.Version)
		case strings.EqualFold(key, "entries"):
			if seenEntries {
				return nil, bad(errTwoEntries)
			}
			seenEntries = true
			err = parseEntries(dec, toc)
		default:
			var skip json.RawMessage
			err = dec.Decode(&skip)
		}
		if err != nil {
			return nil, bad(err)
		}
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, bad(err)
	}
	return toc, nil
}

func parseEntries(dec *json.Decoder, toc *estargz.JTOC) error {
	if t, err := dec.Token(); err != nil || t == nil {
		return err // null: no entries
	} else if t != json.Delim('[') {
		return fmt.Errorf("entries: want an array, got %v", t)
	}
	for dec.More() {
		if len(toc.Entries) == MaxEntries {
			return errTooManyEntries
		}
		e := new(estargz.TOCEntry)
		if err := dec.Decode(e); err != nil {
			return err
		}
		if err := checkEntry(len(toc.Entries), e); err != nil {
			return err
		}
		toc.Entries = append(toc.Entries, e)
	}
	_, err := dec.Token() // ]
	return err
}

// checkEntry checks TOC entry i for sizes the estargz library trusts when
// it allocates.
func checkEntry(i int, e *estargz.TOCEntry) error {
	if e.Type == "reg" || e.Type == "chunk" {
		if e.Size < 0 || e.ChunkSize < 0 {
			return fmt.Errorf("entry %d: negative size", i)
		}
		if e.ChunkSize > 0 && e.Size/e.ChunkSize > MaxEntries {
			return fmt.Errorf("entry %d: %d bytes in chunks of %d is more than %d chunks", i, e.Size, e.ChunkSize, MaxEntries)
		}
	}
	return nil
}

func expectDelim(dec *json.Decoder, d json.Delim) error {
	t, err := dec.Token()
	if err != nil {
		return err
	}
	if t != d {
		return fmt.Errorf("want %v, got %v", d, t)
	}
	return nil
}

// openFooter calls the estargz library, turning its panics on malformed
// input (found by FuzzOpen: a slice out of range in ParseFooter) into
// errors.
func openFooter(sr *io.SectionReader) (off int64, err error) {
	defer recoverInto(&err)
	off, _, err = estargz.OpenFooter(sr)
	return off, err
}

func recoverInto(err *error) {
	if p := recover(); p != nil {
		*err = fmt.Errorf("malformed eStargz data: %v", p)
	}
}
