package reader

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// handMadeData writes 10 bytes of padding, one gzip member per payload,
// then the given TOC and an eStargz footer. An entry's Offset is the index
// of the member it points into, replaced by the member's blob offset.
func handMadeData(t *testing.T, payloads []string, entries []*estargz.TOCEntry) (*memBlob, digest.Digest) {
	t.Helper()
	var buf bytes.Buffer
	buf.Write(make([]byte, 10))
	var offs []int64
	for _, p := range payloads {
		offs = append(offs, int64(buf.Len()))
		zw := gzip.NewWriter(&buf)
		io.WriteString(zw, p)
		zw.Close()
	}
	for _, e := range entries {
		if e.Type == "reg" {
			e.Offset = offs[e.Offset]
		}
	}
	d, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&buf, int64(buf.Len()),
		&estargz.JTOC{Version: 1, Entries: entries}, sha256.New())
	if err != nil {
		t.Fatal(err)
	}
	return &memBlob{data: buf.Bytes()}, d
}

// file is a one-chunk regular file of size bytes in gzip member m whose
// chunk digest is that of content.
func file(name string, m int64, size int64, content string) *estargz.TOCEntry {
	return &estargz.TOCEntry{Name: name, Type: "reg", Size: size, Offset: m,
		ChunkSize: size, ChunkDigest: digest.FromString(content).String()}
}

// TestHostileData covers TOCs whose structure is acceptable but whose
// data is odd or lies: each case says what the reader serves for each
// file, or that the read fails as corrupt.
func TestHostileData(t *testing.T) {
	const corrupt = "\x00corrupt" // the read must fail with ErrCorrupt
	tests := []struct {
		name    string
		payload []string
		entries []*estargz.TOCEntry
		openErr string            // in Open's error, if it must fail
		want    map[string]string // path → content, or corrupt
	}{
		{
			// A chunk's compressed bytes run to the next chunk's offset:
			// two chunks at one offset leave the first with none.
			name:    "overlapping chunks are refused",
			payload: []string{"shared bytes"},
			entries: []*estargz.TOCEntry{file("a", 0, 12, "shared bytes"), file("b", 0, 6, "shared")},
			openErr: "outside the layer data",
		},
		{
			name:    "chunks out of order are refused",
			payload: []string{"one", "two"},
			entries: []*estargz.TOCEntry{file("a", 1, 3, "two"), file("b", 0, 3, "one")},
			openErr: "outside the layer data",
		},
		{
			// Only the declared bytes are read and verified; what
			// follows in the member is never served.
			name:    "decompressed chunk longer than declared serves the declared bytes",
			payload: []string{"hello, and more the TOC does not declare"},
			entries: []*estargz.TOCEntry{file("f", 0, 5, "hello")},
			want:    map[string]string{"f": "hello"},
		},
		{
			name:    "digest over more than the declared bytes fails",
			payload: []string{"hello world"},
			entries: []*estargz.TOCEntry{file("f", 0, 5, "hello world")},
			want:    map[string]string{"f": corrupt},
		},
		{
			name:    "chunk shorter than declared fails",
			payload: []string{"hi"},
			entries: []*estargz.TOCEntry{file("f", 0, 5, "hi\x00\x00\x00")},
			want:    map[string]string{"f": corrupt},
		},
		{
			// A 60 MiB chunk from a few dozen compressed bytes would be a
			// gzip bomb; deflate cannot expand that far, so it is refused
			// before anything is allocated.
			name:    "chunk gzip bomb",
			payload: []string{"tiny"},
			entries: []*estargz.TOCEntry{file("f", 0, 60<<20, "tiny")},
			want:    map[string]string{"f": corrupt},
		},
		{
			name:    "chunk digest mismatch in one file leaves the other readable",
			payload: []string{"good", "evil?"},
			entries: []*estargz.TOCEntry{file("good", 0, 4, "good"), file("bad", 1, 5, "evil!")},
			want:    map[string]string{"good": "good", "bad": corrupt},
		},
		{
			// estargz keeps the last entry of a name; so do we.
			name:    "duplicate names: the last entry wins",
			payload: []string{"second"},
			entries: []*estargz.TOCEntry{
				{Name: "dup", Type: "symlink", LinkName: "first"},
				file("dup", 0, 6, "second"),
			},
			want: map[string]string{"dup": "second"},
		},
		{
			// The TOC is JSON: invalid UTF-8 in a name is decoded as
			// U+FFFD, which makes a valid (if odd) file name.
			name:    "invalid UTF-8 in a name becomes U+FFFD",
			payload: []string{"x"},
			entries: []*estargz.TOCEntry{file("bad\xffname", 0, 1, "x")},
			want:    map[string]string{"bad\uFFFDname": "x"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob, d := handMadeData(t, tt.payload, tt.entries)
			cache := NewCache(1 << 20)
			t.Cleanup(cache.Close)
			l, err := Open(context.Background(), blob, WithTOCDigest(d), WithCache(cache))
			if tt.openErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.openErr) {
					t.Fatalf("Open = %v, want an error containing %q", err, tt.openErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if got := len(l.Root().Children()); got != len(tt.want) {
				t.Errorf("root has %d entries, want %d", got, len(tt.want))
			}
			for name, want := range tt.want {
				n, ok := l.Root().Lookup(name)
				if !ok {
					t.Errorf("%q: not found", name)
					continue
				}
				p := make([]byte, n.Size)
				k, err := l.ReadAt(context.Background(), n, p, 0)
				if want == corrupt {
					if !errors.Is(err, ErrCorrupt) {
						t.Errorf("%q: read = %d, %v; want ErrCorrupt", name, k, err)
					}
					continue
				}
				if err != nil && err != io.EOF {
					t.Errorf("%q: read: %v", name, err)
				}
				if got := string(p[:k]); got != want {
					t.Errorf("%q = %q, want %q", name, got, want)
				}
			}
		})
	}
}

// TestHostileNames covers names and links that need no data: each is
// either dropped or kept as a documented normalisation.
func TestHostileNames(t *testing.T) {
	tests := []struct {
		name    string
		entries []*estargz.TOCEntry
		want    []string // the root's entry names
	}{
		{"empty name is the root itself", []*estargz.TOCEntry{{Name: "", Type: "dir"}, {Name: "a", Type: "dir"}}, []string{"a"}},
		{"dot and dot-dot components are cleaned", []*estargz.TOCEntry{{Name: "./a/../b", Type: "dir"}, {Name: "../../c", Type: "dir"}}, []string{"b", "c"}},
		{"absolute names are made relative", []*estargz.TOCEntry{{Name: "/etc", Type: "dir"}}, []string{"etc"}},
		// Symlinks are served verbatim; the kernel resolves them against
		// the mount's own tree and stops a loop with ELOOP.
		{"symlink loop is served verbatim", []*estargz.TOCEntry{
			{Name: "a", Type: "symlink", LinkName: "b"},
			{Name: "b", Type: "symlink", LinkName: "a"},
			{Name: "out", Type: "symlink", LinkName: "../../../../etc/shadow"},
		}, []string{"a", "b", "out"}},
		{"name longer than 255 bytes is dropped", []*estargz.TOCEntry{{Name: strings.Repeat("n", 256), Type: "dir"}, {Name: "ok", Type: "dir"}}, []string{"ok"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob, d := handMade(t, tt.entries)
			l, err := Open(context.Background(), blob, WithTOCDigest(d))
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			var got []string
			for _, c := range l.Root().Children() {
				got = append(got, c.Name)
			}
			if strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Errorf("root entries = %q, want %q", got, tt.want)
			}
			for _, e := range tt.entries {
				if e.Type != "symlink" {
					continue
				}
				if n, ok := l.Root().Lookup(e.Name); !ok || n.Link != e.LinkName || n.Mode.Type() != os.ModeSymlink {
					t.Errorf("%q: got %+v, want a symlink to %q", e.Name, n, e.LinkName)
				}
			}
		})
	}
}

// hugeTOCBlob is a blob of size bytes, all zero but for an eStargz footer
// that says the TOC starts at tocOff: reading it all would be the bug.
type hugeTOCBlob struct {
	size   int64
	footer []byte
	read   int64
}

func (h *hugeTOCBlob) Size() int64 { return h.size }

func (h *hugeTOCBlob) ReadAt(p []byte, off int64) (int, error) {
	h.read += int64(len(p))
	clear(p)
	fstart := h.size - int64(len(h.footer))
	for i := range p {
		if o := off + int64(i); o >= fstart && o < h.size {
			p[i] = h.footer[o-fstart]
		}
	}
	return len(p), nil
}

// A footer pointing at a TOC of hundreds of MiB is refused after reading
// only the tail, not the TOC.
func TestHugeTOCRefused(t *testing.T) {
	var buf bytes.Buffer
	// Take the footer from a real layer with its TOC at offset 0.
	if _, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&buf, 0, &estargz.JTOC{Version: 1}, sha256.New()); err != nil {
		t.Fatal(err)
	}
	footer := buf.Bytes()[buf.Len()-estargz.FooterSize:]
	blob := &hugeTOCBlob{size: 300 << 20, footer: footer}
	_, err := Open(context.Background(), blob, WithInsecureSkipVerify(true))
	if err == nil || !strings.Contains(err.Error(), "TOC") {
		t.Fatalf("Open = %v, want an error about the TOC's size", err)
	}
	if blob.read > 2<<20 {
		t.Errorf("read %d bytes of a refused layer, want only its tail", blob.read)
	}
	t.Log(err)
}

// rawTOC writes a blob of 10 bytes of padding followed by a TOC whose JSON
// is tocJSON, verbatim, and an eStargz footer; it returns the blob and the
// TOC's digest. For TOCs the estargz library would not write.
func rawTOC(t *testing.T, tocJSON []byte) (*memBlob, digest.Digest) {
	t.Helper()
	var buf bytes.Buffer
	buf.Write(make([]byte, 10))
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: estargz.TOCTarName, Typeflag: tar.TypeReg, Mode: 0o444, Size: int64(len(tocJSON))}); err != nil {
		t.Fatal(err)
	}
	tw.Write(tocJSON)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	// The footer only records the TOC's offset: take one from the
	// library, written for a TOC at the same offset.
	var ref bytes.Buffer
	if _, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&ref, 10, &estargz.JTOC{Version: 1}, sha256.New()); err != nil {
		t.Fatal(err)
	}
	buf.Write(ref.Bytes()[ref.Len()-estargz.FooterSize:])
	return &memBlob{data: buf.Bytes()}, digest.FromBytes(tocJSON)
}

// A TOC of one entry more than MaxEntries is refused while it is parsed.
func TestTooManyEntries(t *testing.T) {
	var b bytes.Buffer
	b.WriteString(`{"version":1,"entries":[{"type":"dir"}`)
	for range MaxEntries {
		b.WriteString(`,{}`)
	}
	b.WriteString(`]}`)
	blob, d := rawTOC(t, b.Bytes())
	_, err := Open(context.Background(), blob, WithTOCDigest(d))
	if want := fmt.Sprintf("more than the limit of %d entries", MaxEntries); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Open = %v, want an error containing %q", err, want)
	}
}

// TestDeclaredSizeNotAllocated: a chunk whose TOC entry declares far more
// bytes than its data holds costs memory for what the data holds, not for
// what is declared.
func TestDeclaredSizeNotAllocated(t *testing.T) {
	rnd := make([]byte, 64<<10) // incompressible: 64 KiB of gzip may declare 64 MiB
	r := rand.New(rand.NewPCG(5, 6))
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	zw.Write(rnd)
	zw.Close()
	tests := []struct {
		name string
		c    chunk
		comp []byte
	}{
		{"gzip", chunk{size: int64(gz.Len()) * 1000}, gz.Bytes()},
		{"zstd", chunk{size: 60 << 20, zstd: true}, zstdFrame(rnd)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := decode(&tt.c, tt.comp)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("decode = %v, want a corrupt-chunk error", err)
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > 8<<20 {
				t.Fatalf("decoding %d bytes declared as %d allocated %d MiB", len(rnd), tt.c.size, got>>20)
			}
		})
	}
}

func zstdFrame(data []byte) []byte {
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	return enc.EncodeAll(data, nil)
}
