package reader

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// zstd:chunked (containers/storage's partial-pull format, also written by
// the estargz library's zstdchunked package) keeps each file chunk in its
// own zstd frame and the TOC ("manifest", the eStargz TOC JSON) zstd-
// compressed in a skippable frame near the end. The two writers differ in
// the footer: the estargz library writes a 40-byte skippable frame ending
// in "GnUlInUx", containers/storage a 64-byte one ending in "GNUlInUx"
// (with tar-split data after the manifest). Both put the manifest's place
// in the layer annotation manifest-position and the digest of its
// compressed bytes in manifest-checksum, so OpenZstdChunked trusts the
// annotations, which the manifest digest covers, and ignores the footer.

// OpenZstdChunked opens a zstd:chunked layer from its manifest annotations:
// position is "offset:length:uncompressedLength:type" and checksum the
// digest of the length compressed bytes at offset. The TOC is checked
// against checksum, and every chunk against its TOC digest when read. With
// WithInsecureSkipVerify an empty checksum is accepted.
func OpenZstdChunked(ctx context.Context, b Blob, checksum digest.Digest, position string, opts ...Option) (*Layer, error) {
	o := options{name: "layer", opaqueXattr: "trusted.overlay.opaque"}
	for _, opt := range opts {
		opt(&o)
	}
	if o.cache == nil {
		o.cache = NewCache(64 << 20)
	}
	if o.logger == nil {
		o.logger = slog.Default()
	}
	if o.demand == nil {
		o.demand = NewDemand()
	}
	fail := func(format string, a ...any) (*Layer, error) {
		return nil, fmt.Errorf("open %s: zstd:chunked: "+format, append([]any{o.name}, a...)...)
	}
	off, length, rawLen, err := parsePosition(position)
	if err != nil {
		return fail("%v", err)
	}
	size := b.Size()
	switch {
	case off < 8 || length <= 0 || off > size || length > size-off:
		return fail("manifest position %q lies outside the %d-byte blob", position, size)
	case length > MaxTOCBytes:
		return fail("TOC of %d bytes exceeds the limit of %d", length, MaxTOCBytes)
	case rawLen > MaxTOCJSONBytes:
		return fail("TOC of %d bytes decompressed exceeds the limit of %d", rawLen, MaxTOCJSONBytes)
	}
	if checksum == "" && !o.skipVerify {
		return nil, fmt.Errorf("open %s: zstd:chunked manifest-checksum annotation is missing: %w", o.name, ErrNoTOCDigest)
	}
	if checksum != "" {
		if err := checksum.Validate(); err != nil {
			return fail("manifest checksum annotation: %v", err)
		}
	}
	// With a Store, the compressed TOC is kept there, so the layer opens
	// without the registry; it is verified like a fetched one.
	store, tocKey := o.cache.store, o.name+"/toc"
	var comp []byte
	if store != nil {
		if t, ok := store.Get(tocKey); ok && int64(len(t)) == length && (checksum == "" || checksum.Algorithm().FromBytes(t) == checksum) {
			comp = t
		}
	}
	if comp == nil {
		comp = make([]byte, length)
		if err := readFull(ctx, b, comp, off); err != nil {
			return fail("read TOC: %v", err)
		}
		if checksum != "" {
			if got := checksum.Algorithm().FromBytes(comp); got != checksum {
				return fail("TOC digest %s does not match the manifest's %s: refusing a tampered layer", got, checksum)
			}
		}
		if store != nil {
			store.Put(tocKey, comp)
		}
	}
	tocJSON, err := decompressTOC(comp)
	if err != nil {
		return fail("%v", err)
	}
	tocDigest := digest.FromBytes(tocJSON)
	l := &Layer{
		name:      o.name,
		blob:      b,
		cache:     o.cache,
		logger:    o.logger,
		tocDigest: tocDigest,
		tocOffset: off - 8, // the skippable frame's header
		demand:    o.demand,
		zstd:      true,
	}
	if err := l.buildTree(tocJSON, size, o.opaqueXattr, !o.skipVerify); err != nil {
		return nil, fmt.Errorf("open %s: %w", o.name, err)
	}
	return l, nil
}

// parsePosition parses "offset:length:uncompressedLength:type" (type 1, the
// eStargz-style TOC, is the only one).
func parsePosition(s string) (off, length, rawLen int64, err error) {
	f := strings.Split(s, ":")
	if len(f) != 4 {
		return 0, 0, 0, fmt.Errorf("manifest position %q: want offset:length:uncompressedLength:type", s)
	}
	var v [4]int64
	for i, x := range f {
		if v[i], err = strconv.ParseInt(x, 10, 64); err != nil || v[i] < 0 {
			return 0, 0, 0, fmt.Errorf("manifest position %q: bad number %q", s, x)
		}
	}
	if v[3] != 1 {
		return 0, 0, 0, fmt.Errorf("manifest position %q: TOC type %d is not supported (want 1)", s, v[3])
	}
	return v[0], v[1], v[2], nil
}

func decompressTOC(comp []byte) ([]byte, error) {
	zr, err := zstd.NewReader(bytes.NewReader(comp), zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxTOCJSONBytes+1))
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	out, err := io.ReadAll(io.LimitReader(zr, MaxTOCJSONBytes+1))
	if err != nil {
		return nil, fmt.Errorf("TOC is not zstd: %v", err)
	}
	if len(out) > MaxTOCJSONBytes {
		return nil, fmt.Errorf("TOC decompresses to more than the limit of %d bytes", MaxTOCJSONBytes)
	}
	return out, nil
}

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(2*MaxChunkSize))
	if err != nil {
		panic(err)
	}
	return d
}}

// decodeZstd decompresses and verifies chunk c of a zstd:chunked layer: a
// zstd frame holding the chunk's bytes.
func decodeZstd(c *chunk, comp []byte) ([]byte, error) {
	zr := zstdDecoders.Get().(*zstd.Decoder)
	defer zstdDecoders.Put(zr)
	if err := zr.Reset(bytes.NewReader(comp)); err != nil {
		return nil, fmt.Errorf("%w: blob bytes %d-%d are not zstd: %v", ErrCorrupt, c.blobOff, c.blobEnd-1, err)
	}
	return readChunk(c, zr, "zstd frame", int64(len(comp)))
}
