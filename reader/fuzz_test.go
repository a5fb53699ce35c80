package reader

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"runtime/pprof"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// exercise walks every node of a layer and reads the start and end of each
// regular file: whatever the blob holds, this must not panic, hang or read
// outside the blob.
func exercise(t *testing.T, blob Blob) {
	cache := NewCache(4 << 20)
	defer cache.Close()
	l, err := Open(context.Background(), blob, WithInsecureSkipVerify(true), WithCache(cache))
	if err != nil {
		return
	}
	exerciseLayer(t, l)
}

// exerciseLayer is exercise for a layer already open: its prioritized
// region prefetched, then every file read at its start and end.
func exerciseLayer(t *testing.T, l *Layer) {
	l.Prefetch(context.Background()) // errors are fine
	p := make([]byte, 4096)
	var walk func(n *Node, depth int)
	walk = func(n *Node, depth int) {
		if depth > MaxDepth+1 {
			t.Fatalf("tree deeper than MaxDepth at %s", n.Path())
		}
		for _, c := range n.Children() {
			if !validName(c.Name) {
				t.Fatalf("invalid name %q", c.Name)
			}
			if c.Node.Mode.IsRegular() {
				// Errors are fine; panics and reads outside the blob are not.
				l.ReadAt(context.Background(), c.Node, p, 0)
				l.ReadAt(context.Background(), c.Node, p, max(c.Node.Size-1, 0))
			}
			if c.Node.IsDir() && c.Node.Parent() == n {
				walk(c.Node, depth+1)
			}
		}
	}
	walk(l.Root(), 0)
}

// withDeadline fails the input if fn runs for more than 10 s: a hostile
// layer must not hang a mount. It dumps the goroutines to say where.
func withDeadline(t *testing.T, input []byte, fn func()) {
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		var buf bytes.Buffer
		pprof.Lookup("goroutine").WriteTo(&buf, 2)
		os.WriteFile(filepath.Join(os.TempDir(), "stargz-fuzz-hang.bin"), input, 0o644)
		t.Fatalf("input took over 10 s:\n%s", buf.String())
	}
}

// boundedBlob refuses reads outside the blob.
type boundedBlob struct {
	t    *testing.T
	data []byte
}

func (b *boundedBlob) Size() int64 { return int64(len(b.data)) }

func (b *boundedBlob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(b.data)) {
		b.t.Fatalf("read outside the blob: %d bytes at %d of %d", len(p), off, len(b.data))
	}
	return copy(p, b.data[off:]), nil
}

func seedLayer(f *testing.F) []byte { return seedLayerT(f) }

func seedLayerT(f testing.TB) []byte {
	b, err := lt.Estargz(lt.Tar(
		lt.Dir("d"), lt.FileString("d/f", "hello"), lt.Hardlink("d/h", "d/f"), lt.Symlink("s", "d"),
		lt.Char("c", 1, 3), lt.Whiteout("gone"), lt.Dir("o"), lt.Opaque("o"),
		lt.File("big", lt.Random("seed", 3000)),
	), estargz.WithChunkSize(1024), estargz.WithPrioritizedFiles([]string{"d/f"}))
	if err != nil {
		f.Fatal(err)
	}
	return b.Data
}

// FuzzOpen feeds arbitrary blobs to Open and reads what it finds.
// Seeds: a real eStargz layer here and testdata/fuzz/FuzzOpen.
func FuzzOpen(f *testing.F) {
	f.Add(seedLayer(f))
	f.Fuzz(func(t *testing.T, data []byte) {
		withDeadline(t, data, func() { exercise(t, &boundedBlob{t: t, data: data}) })
	})
}

// FuzzTOC feeds arbitrary TOC JSON, wrapped in a well-formed footer, to
// Open and reads what it finds.
func FuzzTOC(f *testing.F) {
	b := seedLayer(f)
	f.Add([]byte(`{"version":1,"entries":[{"name":"a","type":"reg","size":5,"offset":1,"chunkSize":5}]}`))
	f.Add([]byte(`{"version":1,"entries":[{"name":"../x","type":"dir"},{"name":"x/y","type":"hardlink","linkName":"x"}]}`))
	f.Fuzz(func(t *testing.T, tocJSON []byte) {
		var toc estargz.JTOC
		if json.Unmarshal(tocJSON, &toc) != nil {
			return
		}
		var buf bytes.Buffer
		buf.Write(b[:min(len(b), 2048)]) // some real gzip data for offsets to land in
		if _, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&buf, int64(buf.Len()), &toc, sha256.New()); err != nil {
			return
		}
		exercise(t, &boundedBlob{t: t, data: buf.Bytes()})
	})
}

// FuzzDecode decodes arbitrary bytes as a chunk: never a panic, never more
// bytes than declared, never unverified bytes.
func FuzzDecode(f *testing.F) {
	f.Add(seedLayer(f)[:200], int64(0), int64(100), true)
	f.Fuzz(func(t *testing.T, comp []byte, inner, size int64, verify bool) {
		if inner < 0 || size <= 0 || size > MaxChunkSize || inner > MaxChunkSize {
			return // Open refuses these
		}
		c := &chunk{size: size, inner: inner, blobEnd: int64(len(comp))}
		if verify {
			c.digest = digest.FromBytes(comp)
		}
		data, err := decode(c, comp)
		if err == nil && int64(len(data)) != size {
			t.Fatalf("decode returned %d bytes, declared %d", len(data), size)
		}
		if err == nil && verify && digest.FromBytes(data) != c.digest {
			t.Fatal("decode returned bytes that do not match the digest")
		}
	})
}

// FuzzParseTOC checks the entry-by-entry TOC decoder against
// encoding/json decoding the whole: whatever parseTOC accepts, the whole
// decode reads the same way.
func FuzzParseTOC(f *testing.F) {
	f.Add([]byte(`{"version":1,"entries":[{"name":"a","type":"reg","size":5,"offset":1,"chunkSize":5}]}`))
	f.Add([]byte(`{"entries":null,"version":1,"x":[1,{"y":2}]}`))
	f.Add([]byte(`{"version":1,"entries":[{"name":"f","type":"chunk","size":1,"chunkSize":-1}]}`))
	f.Add([]byte(`{"version":1,"entries":[{"name":"a","type":"reg","size":-0,"xattrs":{"user.a":"aGk=","user.b":null},"uid":1},{"name":"b","xattrs":null}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		// The fast decoder, where it answers, answers as the general one.
		if fast, ferr := parseTOCFast(b); ferr != errSlowPath {
			slow, serr := parseTOCSlow(b)
			if (ferr == nil) != (serr == nil) || (ferr == nil && !reflect.DeepEqual(fast, slow)) {
				t.Fatalf("fast decoder: %+v, %v; general: %+v, %v", fast, ferr, slow, serr)
			}
		}
		toc, err := parseTOC(b)
		if err != nil {
			return
		}
		var whole estargz.JTOC
		if err := json.Unmarshal(b, &whole); err != nil {
			// The decoder stops at the end of the object; trailing
			// bytes are the only thing it may leave unread.
			return
		}
		if whole.Version != toc.Version || len(whole.Entries) != len(toc.Entries) {
			t.Fatalf("parseTOC read version %d, %d entries; encoding/json %d, %d", toc.Version, len(toc.Entries), whole.Version, len(whole.Entries))
		}
		for i, e := range toc.Entries {
			if w := whole.Entries[i]; w != nil && !reflect.DeepEqual(e, w) {
				t.Fatalf("entry %d: %+v, encoding/json: %+v", i, e, w)
			}
		}
	})
}

// compressible is 3 KiB that compress well: seed layers of a few
// chunks that stay small in testdata.
var compressible = bytes.Repeat([]byte("stargz-mount seed "), 170)

// zstdSeed is a zstd:chunked layer (the estargz library's writer) and its
// manifest-position annotation.
func zstdSeed(f testing.TB) (data []byte, position string) {
	b, err := lt.ZstdChunked(lt.Tar(
		lt.Dir("d"), lt.FileString("d/f", "hello"), lt.Hardlink("d/h", "d/f"), lt.Symlink("s", "d"),
		lt.Whiteout("gone"), lt.File("big", compressible),
	), estargz.WithChunkSize(1024))
	if err != nil {
		f.Fatal(err)
	}
	return b.Data, b.Extra[lt.ZstdChunkedPositionAnnotation]
}

// FuzzOpenZstdChunked feeds arbitrary blobs and manifest-position
// annotations to OpenZstdChunked (the zstd:chunked TOC is located by the
// annotation, not a footer) and reads what it finds. The checksum is left
// out so that mutated TOCs get parsed.
func FuzzOpenZstdChunked(f *testing.F) {
	data, position := zstdSeed(f)
	f.Add(data, position)
	f.Fuzz(func(t *testing.T, data []byte, position string) {
		withDeadline(t, data, func() {
			cache := NewCache(4 << 20)
			defer cache.Close()
			l, err := OpenZstdChunked(context.Background(), &boundedBlob{t: t, data: data}, "", position,
				WithInsecureSkipVerify(true), WithCache(cache))
			if err != nil {
				return
			}
			exerciseLayer(t, l)
		})
	})
}

// FuzzDecodeZstd is FuzzDecode for the zstd frames of zstd:chunked
// layers: never a panic, never more bytes than declared, never
// unverified bytes.
func FuzzDecodeZstd(f *testing.F) {
	data, position := zstdSeed(f)
	l, err := OpenZstdChunked(context.Background(), &memBlob{data: data}, "", position, WithInsecureSkipVerify(true))
	if err != nil {
		f.Fatal(err)
	}
	big, ok := l.Root().Lookup("big")
	if !ok || len(big.chunks) < 2 {
		f.Fatal("seed layer: big has too few chunks")
	}
	for _, c := range big.chunks[:2] {
		comp := data[c.blobOff:c.blobEnd]
		if _, err := decode(&c, comp); err != nil {
			f.Fatalf("seed chunk: %v", err)
		}
		f.Add(comp, c.inner, c.size, false)
		f.Add(comp, c.inner, c.size, true)
	}
	f.Fuzz(func(t *testing.T, comp []byte, inner, size int64, verify bool) {
		// Open refuses the sizes over MaxChunkSize; the allocation of
		// the declared size is bounded by it, so smaller sizes suffice
		// here and keep each run fast.
		if inner < 0 || size <= 0 || size > 4<<20 || inner > MaxChunkSize {
			return
		}
		c := &chunk{size: size, inner: inner, blobEnd: int64(len(comp)), zstd: true}
		if verify {
			c.digest = digest.FromBytes(comp)
		}
		var data []byte
		var err error
		withDeadline(t, comp, func() { data, err = decode(c, comp) })
		if err == nil && int64(len(data)) != size {
			t.Fatalf("decode returned %d bytes, declared %d", len(data), size)
		}
		if err == nil && verify && digest.FromBytes(data) != c.digest {
			t.Fatal("decode returned bytes that do not match the digest")
		}
	})
}
