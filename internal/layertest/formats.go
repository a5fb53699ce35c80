package layertest

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
)

// Layer media types other than LayerMediaType.
const (
	ZstdMediaType         types.MediaType = "application/vnd.oci.image.layer.v1.tar+zstd"
	UncompressedMediaType types.MediaType = "application/vnd.oci.image.layer.v1.tar"
)

// containers/storage's names for the zstd:chunked annotations, which
// podman and buildah write. The estargz library's zstdchunked writer uses
// "io.containers.zstd-chunked.*" instead; ZstdChunked writes both.
const (
	ZstdChunkedChecksumAnnotation = "io.github.containers.zstd-chunked.manifest-checksum"
	ZstdChunkedPositionAnnotation = "io.github.containers.zstd-chunked.manifest-position"
)

// Format is how BuildImageAs compresses layers.
type Format string

const (
	FormatEStargz      Format = "estargz"
	FormatGzip         Format = "gzip"
	FormatZstd         Format = "zstd"
	FormatUncompressed Format = "uncompressed"
	FormatZstdChunked  Format = "zstd:chunked"
)

// Zstd compresses a tar as a plain zstd layer.
func Zstd(tarBytes []byte) (*Blob, error) {
	var buf bytes.Buffer
	zw, err := zstd.NewWriter(&buf)
	if err != nil {
		return nil, err
	}
	zw.Write(tarBytes)
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return withMediaType(buf.Bytes(), tarBytes, ZstdMediaType)
}

// Uncompressed stores a tar as an uncompressed layer.
func Uncompressed(tarBytes []byte) (*Blob, error) {
	return withMediaType(tarBytes, tarBytes, UncompressedMediaType)
}

func withMediaType(data, tarBytes []byte, mt types.MediaType) (*Blob, error) {
	diffID, _, err := v1.SHA256(bytes.NewReader(tarBytes))
	if err != nil {
		return nil, err
	}
	b, err := newBlob(data, diffID.String(), int64(len(tarBytes)))
	if err != nil {
		return nil, err
	}
	b.MediaType = mt
	return b, nil
}

// ZstdChunked builds a zstd:chunked layer with the estargz library's
// zstdchunked compressor. The blob carries the TOC digest annotation and
// the zstd:chunked annotations under both the estargz library's and
// containers/storage's names.
func ZstdChunked(tarBytes []byte, opts ...estargz.Option) (*Blob, error) {
	meta := map[string]string{}
	opts = append(opts, estargz.WithCompression(zstdCompression{
		&zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault, Metadata: meta}, &zstdchunked.Decompressor{}}))
	b, err := Estargz(tarBytes, opts...)
	if err != nil {
		return nil, err
	}
	b.MediaType = ZstdMediaType
	b.Extra = map[string]string{}
	for k, v := range meta {
		b.Extra[k] = v
		b.Extra[strings.Replace(k, "io.containers.", "io.github.containers.", 1)] = v
	}
	return b, nil
}

type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

// decompress undoes a layer's compression by media type.
func decompress(mt types.MediaType, data []byte) (io.ReadCloser, error) {
	switch mt {
	case ZstdMediaType, DockerZstdMediaType:
		d, err := zstd.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	case UncompressedMediaType, types.DockerUncompressedLayer:
		return io.NopCloser(bytes.NewReader(data)), nil
	}
	return gzip.NewReader(bytes.NewReader(data))
}

// BuildImageAs builds an image whose layers (bottom first) are each in
// the format given for it; formats shorter than layers repeat the last.
// eStargz and zstd:chunked layers use chunkSize.
func BuildImageAs(chunkSize int, formats []Format, layers ...[]Entry) (v1.Image, error) {
	blobs, err := buildBlobs(chunkSize, formats, layers)
	if err != nil {
		return nil, err
	}
	return Image(blobs...)
}

// DockerZstdMediaType is the Docker-style name of a zstd layer, which
// containerd and Docker 23+ accept.
const DockerZstdMediaType types.MediaType = "application/vnd.docker.image.rootfs.diff.tar.zstd"

// dockerLayerTypes maps the OCI layer media types to Docker schema2's.
var dockerLayerTypes = map[types.MediaType]types.MediaType{
	LayerMediaType:        types.DockerLayer,
	UncompressedMediaType: types.DockerUncompressedLayer,
	ZstdMediaType:         DockerZstdMediaType,
}

// BuildDockerImageAs is BuildImageAs with Docker schema2 media types: the
// manifest is application/vnd.docker.distribution.manifest.v2+json, the
// config application/vnd.docker.container.image.v1+json, and each layer
// application/vnd.docker.image.rootfs.diff.tar[.gzip|.zstd] (eStargz and
// zstd:chunked layers keep their annotations).
func BuildDockerImageAs(chunkSize int, formats []Format, layers ...[]Entry) (v1.Image, error) {
	blobs, err := buildBlobs(chunkSize, formats, layers)
	if err != nil {
		return nil, err
	}
	for _, b := range blobs {
		b.MediaType = dockerLayerTypes[b.mediaType()]
	}
	img, err := Image(blobs...)
	if err != nil {
		return nil, err
	}
	return mutate.ConfigMediaType(mutate.MediaType(img, types.DockerManifestSchema2), types.DockerConfigJSON), nil
}

func buildBlobs(chunkSize int, formats []Format, layers [][]Entry) ([]*Blob, error) {
	blobs := make([]*Blob, len(layers))
	for i, entries := range layers {
		f := formats[min(i, len(formats)-1)]
		tarBytes := Tar(entries...)
		var b *Blob
		var err error
		switch f {
		case FormatEStargz:
			b, err = Estargz(tarBytes, estargz.WithChunkSize(chunkSize), estargz.WithParallelism(1))
		case FormatGzip:
			b, err = Gzip(tarBytes)
		case FormatZstd:
			b, err = Zstd(tarBytes)
		case FormatUncompressed:
			b, err = Uncompressed(tarBytes)
		case FormatZstdChunked:
			b, err = ZstdChunked(tarBytes, estargz.WithChunkSize(chunkSize), estargz.WithParallelism(1))
		default:
			err = fmt.Errorf("unknown format %q", f)
		}
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		blobs[i] = b
	}
	return blobs, nil
}
