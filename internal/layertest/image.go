package layertest

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Layer annotations written by Image for eStargz layers.
const (
	TOCDigestAnnotation        = "containerd.io/snapshot/stargz/toc.digest"
	UncompressedSizeAnnotation = "io.containers.estargz.uncompressed-size"
)

// LayerMediaType is the media type of every layer Image writes.
const LayerMediaType = types.OCILayer // application/vnd.oci.image.layer.v1.tar+gzip

// Blob is a compressed layer held in memory.
type Blob struct {
	Data             []byte  // gzip-compressed bytes as stored in the registry
	Digest           v1.Hash // sha256 of Data
	DiffID           v1.Hash // sha256 of the uncompressed tar
	UncompressedSize int64
	TOCDigest        string // digest of the TOC JSON; empty for plain gzip
	// MediaType is the layer's media type; empty means LayerMediaType.
	MediaType types.MediaType
	// Extra are more descriptor annotations (zstd:chunked's, for example).
	Extra map[string]string
}

func (b *Blob) mediaType() types.MediaType {
	if b.MediaType == "" {
		return LayerMediaType
	}
	return b.MediaType
}

// Estargz converts an uncompressed tar into an eStargz blob with estargz.Build.
func Estargz(tarBytes []byte, opts ...estargz.Option) (*Blob, error) {
	eb, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarBytes), 0, int64(len(tarBytes))), opts...)
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(eb)
	if cerr := eb.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	size, err := eb.UncompressedSize()
	if err != nil {
		return nil, err
	}
	b, err := newBlob(data, eb.DiffID().String(), size)
	if err != nil {
		return nil, err
	}
	b.TOCDigest = eb.TOCDigest().String()
	return b, nil
}

// Gzip compresses a tar as a plain (non-eStargz) gzip layer.
func Gzip(tarBytes []byte) (*Blob, error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(tarBytes); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	diffID, _, err := v1.SHA256(bytes.NewReader(tarBytes))
	if err != nil {
		return nil, err
	}
	return newBlob(buf.Bytes(), diffID.String(), int64(len(tarBytes)))
}

func newBlob(data []byte, diffID string, size int64) (*Blob, error) {
	d, _, err := v1.SHA256(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	id, err := v1.NewHash(diffID)
	if err != nil {
		return nil, err
	}
	return &Blob{Data: data, Digest: d, DiffID: id, UncompressedSize: size}, nil
}

// Layer returns b as a go-containerregistry layer.
func (b *Blob) Layer() v1.Layer { return blobLayer{b} }

// Annotations returns the descriptor annotations of b: the eStargz ones, or
// none for a plain gzip layer.
func (b *Blob) Annotations() map[string]string {
	if b.TOCDigest == "" && len(b.Extra) == 0 {
		return nil
	}
	a := map[string]string{}
	if b.TOCDigest != "" {
		a[TOCDigestAnnotation] = b.TOCDigest
		a[UncompressedSizeAnnotation] = strconv.FormatInt(b.UncompressedSize, 10)
	}
	for k, v := range b.Extra {
		a[k] = v
	}
	return a
}

type blobLayer struct{ b *Blob }

func (l blobLayer) Digest() (v1.Hash, error) { return l.b.Digest, nil }
func (l blobLayer) DiffID() (v1.Hash, error) { return l.b.DiffID, nil }
func (l blobLayer) Size() (int64, error)     { return int64(len(l.b.Data)), nil }
func (l blobLayer) MediaType() (types.MediaType, error) {
	return l.b.mediaType(), nil
}
func (l blobLayer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.b.Data)), nil
}
func (l blobLayer) Uncompressed() (io.ReadCloser, error) {
	return decompress(l.b.mediaType(), l.b.Data)
}

// Image assembles an OCI image (manifest and config media types are OCI)
// from blobs, bottom layer first. The config is linux/GOARCH with a usable
// Cmd, Env and WorkingDir, and fixed timestamps so the result is reproducible.
func Image(blobs ...*Blob) (v1.Image, error) {
	return ImageWithConfig(v1.Config{
		Cmd:        []string{"/bin/sh"},
		Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		WorkingDir: "/",
	}, blobs...)
}

// BuildImage builds an eStargz image from entry lists (bottom layer first)
// with the given chunk size. Builds use one worker so chunk boundaries do
// not depend on the CPU count.
func BuildImage(chunkSize int, layers ...[]Entry) (v1.Image, error) {
	blobs := make([]*Blob, len(layers))
	for i, entries := range layers {
		b, err := Estargz(Tar(entries...), estargz.WithChunkSize(chunkSize), estargz.WithParallelism(1))
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		blobs[i] = b
	}
	return Image(blobs...)
}

// BuildGzipImage builds an image of plain gzip (non-eStargz) layers, for
// negative tests.
func BuildGzipImage(layers ...[]Entry) (v1.Image, error) {
	blobs := make([]*Blob, len(layers))
	for i, entries := range layers {
		b, err := Gzip(Tar(entries...))
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		blobs[i] = b
	}
	return Image(blobs...)
}
