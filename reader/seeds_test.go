package reader

import (
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

var writeSeeds = flag.Bool("write-seeds", false, "write the fuzz seed corpus to testdata/fuzz (go test -run TestFuzzSeeds -write-seeds)")

// TestFuzzSeeds checks that testdata/fuzz holds the seed corpus
// fuzzSeeds describes; -write-seeds writes it.
func TestFuzzSeeds(t *testing.T) {
	lt.CheckFuzzSeeds(t, fuzzSeeds(t), *writeSeeds)
}

// fuzzSeeds is the seed corpus of this package's fuzz targets: valid
// layers, TOCs and chunks of each kind, and hostile variants of them.
func fuzzSeeds(t testing.TB) lt.FuzzSeeds {
	// The seed layer of FuzzOpen (FuzzTOC puts its head before the TOCs
	// it gets), with a big file that compresses well.
	layer := mustEstargz(t, lt.Tar(
		lt.Dir("d"), lt.FileString("d/f", "hello"), lt.Hardlink("d/h", "d/f"), lt.Symlink("s", "d"),
		lt.Char("c", 1, 3), lt.Whiteout("gone"), lt.Dir("o"), lt.Opaque("o"),
		lt.File("big", compressible),
	), estargz.WithChunkSize(1024), estargz.WithPrioritizedFiles([]string{"d/f"}))
	head := seedLayerT(t)[:2048] // what FuzzTOC puts before its TOCs
	small := mustEstargz(t, lt.Tar(
		lt.FileString("a", "alpha"), lt.FileString("b", "bravo"), lt.Fifo("p"), lt.Block("blk", 8, 1),
		lt.FileString("x", "with xattr", lt.Xattr("user.k", "v")), lt.Dir("dir", lt.Mode(0o1777)),
	), estargz.WithMinChunkSize(1<<10)) // small files share a gzip member: inner offsets
	empty := mustEstargz(t, lt.Tar())
	plain, err := lt.Gzip(lt.Tar(lt.FileString("plain", "not eStargz")))
	if err != nil {
		t.Fatal(err)
	}
	tampered := append([]byte{}, layer...)
	tampered[len(tampered)-estargz.FooterSize-40] ^= 0x20 // inside the TOC's gzip stream
	hostile := tocBlob(t, []*estargz.TOCEntry{
		{Name: "../../etc", Type: "dir"}, {Name: "/abs", Type: "reg"}, {Name: "l", Type: "hardlink", LinkName: "../../etc"},
	})

	// TOC JSON: the seed layer's, and one whose offsets land in the
	// first 2048 bytes of the seed layer, which FuzzTOC puts before it.
	toc := tocJSON(t, layer)
	fitting := fittingTOC(t, seedLayerT(t), int64(len(head)))
	{
		// As FuzzTOC wraps it, it opens, and d/f reads.
		var toc estargz.JTOC
		json.Unmarshal(fitting, &toc)
		buf := bytes.NewBuffer(append([]byte{}, head...))
		if _, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(buf, int64(len(head)), &toc, sha256.New()); err != nil {
			t.Fatal(err)
		}
		l, err := Open(context.Background(), &memBlob{data: buf.Bytes()}, WithInsecureSkipVerify(true))
		if err != nil {
			t.Fatalf("fitting TOC: %v", err)
		}
		if _, comp := checkedChunk(t, l, buf.Bytes(), "d/f"); len(comp) == 0 {
			t.Fatal("fitting TOC: d/f has no data")
		}
	}

	seeds := lt.FuzzSeeds{
		"FuzzOpen": {
			"estargz-layer":          {layer},
			"estargz-inner-offsets":  {small},
			"estargz-empty":          {empty},
			"estargz-tampered-toc":   {tampered},
			"estargz-hostile-names":  {hostile},
			"estargz-truncated-tail": {layer[:len(layer)-estargz.FooterSize/2]},
			"plain-gzip":             {plain.Data},
		},
		"FuzzTOC": {
			"seed-layer-toc":       {toc},
			"toc-fitting-the-data": {fitting},
			"small-layer-toc":      {tocJSON(t, small)},
		},
		"FuzzParseTOC": {
			"seed-layer-toc":   {toc},
			"small-layer-toc":  {tocJSON(t, small)},
			"escapes-and-case": {[]byte(`{"Version":1,"ENTRIES":[{"Name":"\u0061\/b","type":"reg","size":1e0,"chunkDigest":"sha256:\u0030"}]}`)},
			"repeated-keys":    {[]byte(`{"entries":[{"name":"x"}],"version":1,"entries":[{"name":"a","name":"b","size":1,"size":2}]}`)},
			"floats-and-big":   {[]byte(`{"version":1.0,"entries":[{"name":"f","type":"reg","size":9223372036854775808,"offset":-1.5}]}`)},
			"unknown-fields":   {[]byte(`{"version":1,"x":{"entries":[]},"entries":[{"name":"d","type":"dir","z":[1,{"a":null}],"xattrs":{"user.a":"!!"}}]} trailing`)},
			"invalid-utf8":     {[]byte("{\"version\":1,\"entries\":[{\"name\":\"bad\xffname\",\"type\":\"dir\"}]}")},
		},
	}
	for name, entries := range hostileTOCs() {
		b, err := json.Marshal(estargz.JTOC{Version: 1, Entries: entries})
		if err != nil {
			t.Fatal(err)
		}
		seeds["FuzzTOC"][name] = []any{b}
		seeds["FuzzParseTOC"][name] = []any{b}
	}

	// Chunks: real gzip members of the seed layers (checked to decode),
	// and hostile ones.
	decode := map[string][]any{}
	for _, l := range []struct {
		name string
		data []byte
		file string
	}{{"seed-layer", layer, "big"}, {"seed-layer-small-file", layer, "d/f"}, {"inner-offset", small, "b"}} {
		c, comp := firstChunk(t, l.data, l.file)
		if c.inner == 0 && l.name == "inner-offset" {
			t.Fatalf("%s: chunk of %s has no inner offset", l.name, l.file)
		}
		decode[l.name] = []any{comp, c.inner, c.size, false}
		decode[l.name+"-verified"] = []any{comp, c.inner, c.size, true}
		decode[l.name+"-truncated"] = []any{comp[:len(comp)/2], c.inner, c.size, false}
	}
	var zeros bytes.Buffer
	zw := gzip.NewWriter(&zeros)
	zw.Write(make([]byte, 1<<20))
	zw.Close()
	decode["megabyte-of-zeros"] = []any{zeros.Bytes(), int64(0), int64(1 << 20), false}
	decode["declared-beyond-deflate"] = []any{zeros.Bytes(), int64(0), int64(MaxChunkSize), false}
	decode["not-gzip"] = []any{[]byte("\x1f\x8b\x08\x00 not really gzip"), int64(0), int64(5), false}
	seeds["FuzzDecode"] = decode

	zdata, position := zstdSeed(t)
	zsmall, err := lt.ZstdChunked(lt.Tar(lt.FileString("a", "alpha"), lt.FileString("b", "bravo"), lt.Fifo("p")),
		estargz.WithMinChunkSize(1<<10))
	if err != nil {
		t.Fatal(err)
	}
	storageFooter := append([]byte{}, zdata[:len(zdata)-48]...)
	footer := make([]byte, 64)
	copy(footer[56:], "GNUlInUx")
	storageFooter = append(append(storageFooter, 0x50, 0x2a, 0x4d, 0x18, 64, 0, 0, 0), footer...)
	var off, length, raw, typ int64
	fmt.Sscanf(position, "%d:%d:%d:%d", &off, &length, &raw, &typ)
	seeds["FuzzOpenZstdChunked"] = map[string][]any{
		"zstd-chunked-layer":         {zdata, position},
		"containers-storage-footer":  {storageFooter, position},
		"inner-offsets":              {zsmall.Data, zsmall.Extra[lt.ZstdChunkedPositionAnnotation]},
		"position-short-by-one":      {zdata, fmt.Sprintf("%d:%d:%d:1", off, length-1, raw)},
		"position-wrong-raw-length":  {zdata, fmt.Sprintf("%d:%d:%d:1", off, length, raw/2)},
		"position-unknown-type":      {zdata, fmt.Sprintf("%d:%d:%d:2", off, length, raw)},
		"position-at-data-not-a-toc": {zdata, fmt.Sprintf("8:%d:%d:1", length, raw)},
	}
	zdecode := map[string][]any{}
	for _, l := range []struct {
		name, position string
		data           []byte
		file           string
	}{{"zstd-chunk", position, zdata, "big"}, {"zstd-inner-offset", zsmall.Extra[lt.ZstdChunkedPositionAnnotation], zsmall.Data, "b"}} {
		c, comp := firstZstdChunk(t, l.data, l.position, l.file)
		zdecode[l.name] = []any{comp, c.inner, c.size, false}
		zdecode[l.name+"-verified"] = []any{comp, c.inner, c.size, true}
		zdecode[l.name+"-truncated"] = []any{comp[:len(comp)/2], c.inner, c.size, false}
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	zzeros := enc.EncodeAll(make([]byte, 1<<20), nil)
	two := append(enc.EncodeAll([]byte("first"), nil), enc.EncodeAll([]byte("second"), nil)...)
	enc.Close()
	zdecode["megabyte-of-zeros"] = []any{zzeros, int64(0), int64(1 << 20), false}
	zdecode["two-frames"] = []any{two, int64(3), int64(8), false}
	zdecode["skippable-frame"] = []any{append([]byte{0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4}, two...), int64(0), int64(5), false}
	seeds["FuzzDecodeZstd"] = zdecode
	seeds["FuzzStored"] = storedSeeds(t)
	return seeds
}

// storedSeeds are FuzzStored's: gzip members of stored blocks, as
// incompressible chunks have, and members that only look like them.
func storedSeeds(t testing.TB) map[string][]any {
	rnd := lt.Random("stored", 2000)
	member := gzipMember(t, rnd, stdgzip.NoCompression, false)
	badLen := append([]byte{}, member...)
	badLen[10+3] ^= 1 // NLEN of the block no longer ^LEN
	var two bytes.Buffer
	zw, err := stdgzip.NewWriterLevel(&two, stdgzip.NoCompression)
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(rnd[:700])
	zw.Flush() // ends the block, adds an empty one
	zw.Write(rnd[700:1500])
	zw.Close()
	// An eStargz chunk of random data: deflate stores it.
	layer := mustEstargz(t, lt.Tar(lt.File("r", rnd)), estargz.WithChunkSize(1024))
	c, comp := firstChunk(t, layer, "r")
	if _, ok := storedChunk(comp, c.inner, c.size); !ok {
		t.Fatal("the eStargz chunk of random data is not stored blocks")
	}
	return map[string][]any{
		"stored-whole":          {member, int64(0), int64(len(rnd))},
		"stored-inner":          {member, int64(100), int64(500)},
		"stored-named-header":   {gzipMember(t, rnd, stdgzip.NoCompression, true), int64(1), int64(len(rnd) - 1)},
		"stored-corrupt-length": {badLen, int64(0), int64(len(rnd))},
		"stored-truncated":      {member[:1000], int64(0), int64(len(rnd))},
		"stored-past-the-end":   {member, int64(1990), int64(11)},
		"two-stored-blocks":     {two.Bytes(), int64(600), int64(300)},
		"compressed-member":     {gzipMember(t, compressible, stdgzip.DefaultCompression, false), int64(0), int64(100)},
		"estargz-random-chunk":  {comp, c.inner, c.size},
	}
}

// hostileTOCs are TOCs of the kinds README.md's Trust section lists.
func hostileTOCs() map[string][]*estargz.TOCEntry {
	const d = "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881" // of "x"
	deep := strings.Repeat("d/", MaxDepth+2) + "f"
	return map[string][]*estargz.TOCEntry{
		"hostile-names": {
			{Name: "../../etc", Type: "dir"}, {Name: "/abs", Type: "dir"}, {Name: "./a/../b", Type: "dir"},
			{Name: "", Type: "dir"}, {Name: strings.Repeat("n", 256), Type: "dir"}, {Name: "bad\xffname", Type: "dir"},
		},
		"hostile-links": {
			{Name: "d", Type: "dir"}, {Name: "to-dir", Type: "hardlink", LinkName: "d"},
			{Name: "to-nothing", Type: "hardlink", LinkName: "nowhere"},
			{Name: "loop1", Type: "symlink", LinkName: "loop2"}, {Name: "loop2", Type: "symlink", LinkName: "loop1"},
			{Name: "out", Type: "symlink", LinkName: "../../../../etc/shadow"},
		},
		"hostile-tree": {
			{Name: "f", Type: "symlink", LinkName: "x"}, {Name: "f/child", Type: "dir"},
			{Name: "dup", Type: "dir"}, {Name: "dup", Type: "fifo"},
			{Name: deep, Type: "reg"},
			{Name: "", Type: "reg", Size: 1, Offset: 10, ChunkSize: 1, ChunkDigest: d},
		},
		"hostile-sizes": {
			{Name: "neg-size", Type: "reg", Size: -5, Offset: 10, ChunkSize: 5, ChunkDigest: d},
			{Name: "neg-off", Type: "reg", Size: 5, Offset: -5, ChunkSize: 5, ChunkDigest: d},
			{Name: "neg-chunk", Type: "reg", Size: 5, Offset: 10, ChunkSize: -1, ChunkDigest: d},
			{Name: "huge", Type: "reg", Size: 1 << 60, Offset: 10, ChunkSize: 1, ChunkDigest: d},
			{Name: "inner", Type: "reg", Size: 5, Offset: 10, ChunkSize: 5, InnerOffset: 1 << 40, ChunkDigest: d},
			{Name: "dev", Type: "char", DevMajor: 1 << 20, DevMinor: -1},
			{Name: "owner", Type: "dir", UID: -1, GID: 1 << 40},
		},
		"hostile-chunks": {
			{Name: "f", Type: "reg", Size: 30, Offset: 10, ChunkSize: 10, ChunkDigest: d},
			{Name: "f", Type: "chunk", Offset: 10, ChunkOffset: 10, ChunkSize: 10, ChunkDigest: d}, // overlaps the first
			{Name: "f", Type: "chunk", Offset: 5, ChunkOffset: 20, ChunkSize: 10, ChunkDigest: d},  // out of order
			{Name: "g", Type: "reg", Size: 10, Offset: 1 << 40, ChunkSize: 10, ChunkDigest: d},     // outside the blob
			{Name: "h", Type: "reg", Size: 10, Offset: 20, ChunkSize: 10, ChunkDigest: "md5:zz"},
		},
		"overlay-xattrs-and-whiteouts": {
			{Name: "d", Type: "dir", Xattrs: map[string][]byte{"trusted.overlay.redirect": []byte("/etc"), "user.ok": []byte("v")}},
			{Name: "d/.wh..wh..opq", Type: "reg"}, {Name: "d/.wh.gone", Type: "reg"}, {Name: "d/.wh.", Type: "reg"},
			{Name: ".prefetch.landmark", Type: "reg", Size: 1, Offset: 10, ChunkSize: 1, ChunkDigest: d},
		},
	}
}

func mustEstargz(t testing.TB, tarBytes []byte, opts ...estargz.Option) []byte {
	b, err := lt.Estargz(tarBytes, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return b.Data
}

// tocBlob is a blob of 10 bytes of padding, then entries' TOC and footer.
func tocBlob(t testing.TB, entries []*estargz.TOCEntry) []byte {
	var buf bytes.Buffer
	buf.Write(make([]byte, 10))
	if _, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&buf, 10, &estargz.JTOC{Version: 1, Entries: entries}, sha256.New()); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// tocJSON is the TOC JSON of eStargz blob b.
func tocJSON(t testing.TB, b []byte) []byte {
	off, _, err := estargz.OpenFooter(io.NewSectionReader(bytes.NewReader(b), 0, int64(len(b))))
	if err != nil {
		t.Fatal(err)
	}
	j, err := readTOCJSON(b[off:])
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// fittingTOC is the TOC of eStargz blob b without the files whose chunks
// start at or past blob offset end.
func fittingTOC(t testing.TB, b []byte, end int64) []byte {
	var toc estargz.JTOC
	if err := json.Unmarshal(tocJSON(t, b), &toc); err != nil {
		t.Fatal(err)
	}
	drop := map[string]bool{}
	for _, e := range toc.Entries {
		if (e.Type == "reg" || e.Type == "chunk") && e.Offset >= end {
			drop[e.Name] = true
		}
	}
	var kept []*estargz.TOCEntry
	for _, e := range toc.Entries {
		if !drop[e.Name] && !(e.Type == "hardlink" && drop[e.LinkName]) {
			kept = append(kept, e)
		}
	}
	if len(kept) == len(toc.Entries) || len(drop) == len(toc.Entries) {
		t.Fatalf("fittingTOC: kept %d of %d entries", len(kept), len(toc.Entries))
	}
	toc.Entries = kept
	j, err := json.Marshal(&toc)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// firstChunk returns the first chunk of file in eStargz blob b and its
// compressed bytes, checking that they decode.
func firstChunk(t testing.TB, b []byte, file string) (chunk, []byte) {
	l, err := Open(context.Background(), &memBlob{data: b}, WithInsecureSkipVerify(true))
	if err != nil {
		t.Fatal(err)
	}
	return checkedChunk(t, l, b, file)
}

// firstZstdChunk is firstChunk for a zstd:chunked blob.
func firstZstdChunk(t testing.TB, b []byte, position, file string) (chunk, []byte) {
	l, err := OpenZstdChunked(context.Background(), &memBlob{data: b}, "", position, WithInsecureSkipVerify(true))
	if err != nil {
		t.Fatal(err)
	}
	return checkedChunk(t, l, b, file)
}

func checkedChunk(t testing.TB, l *Layer, b []byte, file string) (chunk, []byte) {
	n := l.Root()
	for _, p := range strings.Split(file, "/") {
		var ok bool
		if n, ok = n.Lookup(p); !ok {
			t.Fatalf("%s not found", file)
		}
	}
	if len(n.chunks) == 0 {
		t.Fatalf("%s has no chunks", file)
	}
	c := n.chunks[0]
	comp := b[c.blobOff:c.blobEnd]
	if _, err := decode(&c, comp); err != nil {
		t.Fatalf("chunk of %s: %v", file, err)
	}
	return c, comp
}
