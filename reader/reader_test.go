package reader

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// memBlob is a blob in memory that counts reads.
type memBlob struct {
	data  []byte
	reads atomic.Int64
}

func (m *memBlob) Size() int64 { return int64(len(m.data)) }

func (m *memBlob) ReadAt(p []byte, off int64) (int, error) {
	m.reads.Add(1)
	return bytes.NewReader(m.data).ReadAt(p, off)
}

func build(t *testing.T, chunk int, entries ...lt.Entry) (*memBlob, digest.Digest) {
	t.Helper()
	b, err := lt.Estargz(lt.Tar(entries...), estargz.WithChunkSize(chunk))
	if err != nil {
		t.Fatal(err)
	}
	return &memBlob{data: b.Data}, digest.Digest(b.TOCDigest)
}

func open(t *testing.T, b *memBlob, d digest.Digest, opts ...Option) *Layer {
	t.Helper()
	l, err := Open(context.Background(), b, append([]Option{WithTOCDigest(d)}, opts...)...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l
}

func lookup(t *testing.T, l *Layer, path ...string) *Node {
	t.Helper()
	n := l.Root()
	for _, p := range path {
		c, ok := n.Lookup(p)
		if !ok {
			t.Fatalf("lookup %v: %q not found in %s", path, p, n.Path())
		}
		n = c
	}
	return n
}

func readAll(t *testing.T, l *Layer, n *Node) []byte {
	t.Helper()
	out := make([]byte, n.Size)
	if got, err := l.ReadAt(context.Background(), n, out, 0); got != len(out) || (err != nil && err != io.EOF) {
		t.Fatalf("read %s: %d, %v", n.Path(), got, err)
	}
	return out
}

func TestTree(t *testing.T) {
	big := lt.Random("big", 300_000)
	blob, d := build(t, 64<<10,
		lt.Dir("etc", lt.Mode(0o750), lt.Owner(1000, 1001)),
		lt.FileString("etc/passwd", "root:x:0:0\n", lt.Mode(0o4755), lt.Xattr("user.note", "hi")),
		lt.Hardlink("etc/passwd-link", "etc/passwd"),
		lt.Hardlink("passwd-top", "etc/passwd"),
		lt.Symlink("etc/link", "../usr/bin"),
		lt.Char("null", 1, 3, lt.Mode(0o666)),
		lt.Block("sda", 8, 0, lt.Mode(0o660)),
		lt.Fifo("fifo"),
		lt.Dir("tmp", lt.Mode(0o1777)),
		lt.Dir("gone"),
		lt.Whiteout("gone/file"),
		lt.Whiteout("olddir"),
		lt.Dir("opq"),
		lt.Opaque("opq"),
		lt.FileString("opq/new", "new"),
		lt.FileString("both", "real"),
		lt.Whiteout("both"),
		lt.File("big", big),
		lt.File("empty", nil),
		lt.FileString("evil", "x", lt.Xattr("trusted.overlay.redirect", "/etc"), lt.Xattr("user.overlay.opaque", "y"),
			lt.Xattr("user.fuseoverlayfs.override_stat", "0:0:04755"), lt.Xattr("user.containers.override_stat", "0:0:04755")),
	)
	l := open(t, blob, d)

	root := l.Root()
	names := []string{}
	for _, c := range root.Children() {
		names = append(names, c.Name)
	}
	wantNames := []string{"big", "both", "empty", "etc", "evil", "fifo", "gone", "null", "olddir", "opq", "passwd-top", "sda", "tmp"}
	if !equal(names, wantNames) {
		t.Errorf("root children = %q, want %q", names, wantNames)
	}

	etc := lookup(t, l, "etc")
	if etc.Mode != os.ModeDir|0o750 || etc.UID != 1000 || etc.GID != 1001 {
		t.Errorf("etc: mode %v owner %d:%d", etc.Mode, etc.UID, etc.GID)
	}
	passwd := lookup(t, l, "etc", "passwd")
	if passwd.Mode != os.ModeSetuid|0o755 || string(passwd.Xattrs["user.note"]) != "hi" {
		t.Errorf("passwd: mode %v xattrs %q", passwd.Mode, passwd.Xattrs)
	}
	if lookup(t, l, "etc", "passwd-link") != passwd || lookup(t, l, "passwd-top") != passwd || passwd.Nlink != 3 {
		t.Errorf("hardlinks do not share one node with nlink 3 (nlink %d)", passwd.Nlink)
	}
	if string(readAll(t, l, lookup(t, l, "passwd-top"))) != "root:x:0:0\n" {
		t.Error("hardlink content differs")
	}
	if ln := lookup(t, l, "etc", "link"); ln.Mode&os.ModeSymlink == 0 || ln.Link != "../usr/bin" {
		t.Errorf("symlink: %v %q", ln.Mode, ln.Link)
	}
	if n := lookup(t, l, "null"); n.Mode != os.ModeDevice|os.ModeCharDevice|0o666 || n.Major != 1 || n.Minor != 3 {
		t.Errorf("null: %v %d:%d", n.Mode, n.Major, n.Minor)
	}
	if n := lookup(t, l, "sda"); n.Mode != os.ModeDevice|0o660 || n.Major != 8 || n.Minor != 0 {
		t.Errorf("sda: %v %d:%d", n.Mode, n.Major, n.Minor)
	}
	if n := lookup(t, l, "fifo"); n.Mode&os.ModeNamedPipe == 0 {
		t.Errorf("fifo: %v", n.Mode)
	}
	if n := lookup(t, l, "tmp"); n.Mode != os.ModeDir|os.ModeSticky|0o777 {
		t.Errorf("tmp: %v", n.Mode)
	}
	for _, p := range [][]string{{"gone", "file"}, {"olddir"}} {
		n := lookup(t, l, p...)
		if n.Mode != os.ModeDevice|os.ModeCharDevice || n.Major != 0 || n.Minor != 0 {
			t.Errorf("whiteout %v: mode %v rdev %d:%d, want 0/0 char device", p, n.Mode, n.Major, n.Minor)
		}
	}
	if len(lookup(t, l, "gone").Children()) != 1 {
		t.Errorf("gone: %d children, want only the whiteout", len(lookup(t, l, "gone").Children()))
	}
	if both := lookup(t, l, "both"); !both.Mode.IsRegular() || string(readAll(t, l, both)) != "real" {
		t.Errorf("both: a real file and its whiteout in one layer must show the file, got %v", both.Mode)
	}
	if v := lookup(t, l, "opq").Xattrs["trusted.overlay.opaque"]; string(v) != "y" {
		t.Errorf("opq: opaque xattr = %q", v)
	}
	if _, ok := lookup(t, l, "opq").Lookup(".wh..wh..opq"); ok {
		t.Error("opaque marker is visible")
	}
	if x := lookup(t, l, "evil").Xattrs; len(x) != 0 {
		t.Errorf("overlay xattrs from the layer leak through: %q", x)
	}
	if !bytes.Equal(readAll(t, l, lookup(t, l, "big")), big) {
		t.Error("big: content differs")
	}
	if n := lookup(t, l, "empty"); n.Size != 0 || len(readAll(t, l, n)) != 0 {
		t.Error("empty is not empty")
	}
	// Directory link counts: 2 + subdirectories.
	subdirs := 0
	for _, c := range root.Children() {
		if c.Node.IsDir() {
			subdirs++
		}
	}
	if root.Nlink != uint32(2+subdirs) {
		t.Errorf("root nlink = %d, want %d", root.Nlink, 2+subdirs)
	}
	// Inode numbers are unique.
	seen := map[uint64]string{}
	var walk func(n *Node)
	walk = func(n *Node) {
		for _, c := range n.Children() {
			if p, dup := seen[c.Node.Ino]; dup && c.Node != lookup(t, l, "passwd-top") {
				t.Errorf("inode %d shared by %s and %s", c.Node.Ino, p, c.Node.Path())
			}
			seen[c.Node.Ino] = c.Node.Path()
			walk(c.Node)
		}
	}
	walk(root)
}

func TestUserXattrOpaque(t *testing.T) {
	blob, d := build(t, 64<<10, lt.Dir("opq"), lt.Opaque("opq"))
	l := open(t, blob, d, WithOpaqueXattr("user.overlay.opaque"))
	x := lookup(t, l, "opq").Xattrs
	if string(x["user.overlay.opaque"]) != "y" || len(x) != 1 {
		t.Errorf("xattrs = %q, want only user.overlay.opaque=y", x)
	}
}

func TestLandmarksHidden(t *testing.T) {
	b, err := lt.Estargz(lt.Tar(lt.FileString("a", "first"), lt.FileString("b", "second")),
		estargz.WithPrioritizedFiles([]string{"a"}))
	if err != nil {
		t.Fatal(err)
	}
	l := open(t, &memBlob{data: b.Data}, digest.Digest(b.TOCDigest))
	for _, c := range l.Root().Children() {
		if c.Name == estargz.PrefetchLandmark || c.Name == estargz.NoPrefetchLandmark {
			t.Errorf("%s is visible", c.Name)
		}
	}
	if l.PrefetchBytes() <= 0 || l.PrefetchBytes() >= int64(len(b.Data)) {
		t.Errorf("PrefetchBytes = %d", l.PrefetchBytes())
	}
}

func TestOpenRequests(t *testing.T) {
	var entries []lt.Entry
	for i := range 3000 {
		entries = append(entries, lt.FileString("d/"+string(rune('a'+i%26))+strconv.Itoa(i), strconv.Itoa(i)))
	}
	tests := []struct {
		name string
		tail int64
		want int64
	}{
		{"TOC inside the tail: one request", 1 << 20, 1},
		{"TOC larger than the tail: two requests", 4 << 10, 2},
	}
	blob, d := build(t, 64<<10, append([]lt.Entry{lt.Dir("d")}, entries...)...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob.reads.Store(0)
			l := open(t, blob, d, WithTailSize(tt.tail))
			if got := blob.reads.Load(); got != tt.want {
				t.Errorf("Open made %d reads, want %d", got, tt.want)
			}
			if n := len(lookup(t, l, "d").Children()); n != 3000 {
				t.Errorf("d has %d entries", n)
			}
		})
	}
}

func TestVerification(t *testing.T) {
	content := lt.Random("v", 200_000)
	blob, d := build(t, 64<<10, lt.File("victim", content), lt.FileString("bystander", "fine"))
	ctx := context.Background()

	t.Run("no TOC digest is refused", func(t *testing.T) {
		_, err := Open(ctx, blob, WithTOCDigest(""))
		if !errors.Is(err, ErrNoTOCDigest) {
			t.Errorf("Open without digest = %v, want ErrNoTOCDigest", err)
		}
		// The error says which annotation is missing and how to proceed.
		for _, want := range []string{estargz.TOCJSONDigestAnnotation + " is missing", "ctr-remote image optimize", "--insecure-skip-verify"} {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Open without digest = %v, want it to say %q", err, want)
			}
		}
		if _, err := Open(ctx, blob, WithInsecureSkipVerify(true)); err != nil {
			t.Errorf("Open with skip-verify: %v", err)
		}
	})
	t.Run("wrong TOC digest is refused", func(t *testing.T) {
		if _, err := Open(ctx, blob, WithTOCDigest(digest.FromString("other"))); err == nil {
			t.Error("Open accepted a TOC with the wrong digest")
		}
	})
	t.Run("flipped byte fails only that file", func(t *testing.T) {
		l := open(t, blob, d)
		victim := lookup(t, l, "victim")
		// Flip a byte inside the victim's second chunk.
		c := victim.chunks[1]
		bad := &memBlob{data: append([]byte(nil), blob.data...)}
		bad.data[c.blobOff+(c.blobEnd-c.blobOff)/2] ^= 0xff
		l = open(t, bad, d)
		victim = lookup(t, l, "victim")
		p := make([]byte, 100)
		if _, err := l.ReadAt(ctx, victim, p, c.off+10); !errors.Is(err, ErrCorrupt) {
			t.Errorf("read of corrupt chunk = %v, want ErrCorrupt", err)
		}
		if _, err := l.ReadAt(ctx, victim, p, 0); err != nil {
			t.Errorf("first chunk of victim: %v", err)
		}
		if got := readAll(t, l, lookup(t, l, "bystander")); string(got) != "fine" {
			t.Errorf("bystander = %q", got)
		}
	})
}

func TestConcurrentReads(t *testing.T) {
	content := lt.Random("c", 2<<20)
	blob, d := build(t, 64<<10, lt.File("f", content))
	l := open(t, blob, d, WithCache(NewCache(1<<20))) // smaller than the file: evictions happen
	n := lookup(t, l, "f")
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 200 {
				off := r.Int64N(int64(len(content)))
				p := make([]byte, 1+r.IntN(200_000))
				got, err := l.ReadAt(context.Background(), n, p, off)
				if err != nil && err != io.EOF {
					t.Errorf("ReadAt(%d): %v", off, err)
					return
				}
				if !bytes.Equal(p[:got], content[off:off+int64(got)]) {
					t.Errorf("ReadAt(%d, %d) returned wrong bytes", off, len(p))
					return
				}
			}
		}()
	}
	wg.Wait()
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// BenchmarkReadSequential reads a 64 MiB file of 4 MiB chunks (estargz's
// default) front to back in 128 KiB requests, as the kernel sends them, from
// an in-memory blob: the cost of decompressing, verifying and caching.
func BenchmarkReadSequential(b *testing.B) {
	content := lt.Random("bench", 64<<20)
	eb, err := lt.Estargz(lt.Tar(lt.File("f", content)))
	if err != nil {
		b.Fatal(err)
	}
	blob := &memBlob{data: eb.Data}
	p := make([]byte, 128<<10)
	b.SetBytes(int64(len(content)))
	for b.Loop() {
		l, err := Open(context.Background(), blob, WithTOCDigest(digest.Digest(eb.TOCDigest)), WithCache(NewCache(16<<20)))
		if err != nil {
			b.Fatal(err)
		}
		n, _ := l.Root().Lookup("f")
		for off := int64(0); off < n.Size; off += int64(len(p)) {
			if _, err := l.ReadAt(context.Background(), n, p, off); err != nil && err != io.EOF {
				b.Fatal(err)
			}
		}
	}
}

// TestReadAheadRequests checks that a sequential read of a file of many
// small chunks costs a request per readAhead window, not one per chunk.
func TestReadAheadRequests(t *testing.T) {
	content := lt.Random("ra", 6<<20) // 96 chunks of 64 KiB, ~6 MiB compressed
	blob, d := build(t, 64<<10, lt.File("f", content))
	l := open(t, blob, d)
	n := lookup(t, l, "f")
	blob.reads.Store(0)
	got := make([]byte, 0, len(content))
	p := make([]byte, 128<<10)
	for off := int64(0); off < n.Size; off += int64(len(p)) {
		k, err := l.ReadAt(context.Background(), n, p, off)
		if err != nil && err != io.EOF {
			t.Fatal(err)
		}
		got = append(got, p[:k]...)
	}
	if !bytes.Equal(got, content) {
		t.Fatal("content differs")
	}
	if r := blob.reads.Load(); r > 3 {
		t.Errorf("sequential read of %d chunks made %d requests, want at most 3", len(n.chunks), r)
	}
}

// TestHostileTOC opens blobs whose TOC a hostile builder wrote by hand.
func TestHostileTOC(t *testing.T) {
	reg := func(name string, size, off int64, extra ...func(*estargz.TOCEntry)) *estargz.TOCEntry {
		e := &estargz.TOCEntry{Name: name, Type: "reg", Size: size, Offset: off, ChunkSize: size, ChunkDigest: digest.FromString("x").String()}
		for _, f := range extra {
			f(e)
		}
		return e
	}
	tests := []struct {
		name    string
		entries []*estargz.TOCEntry
		want    string                       // in the error; "" means Open succeeds
		check   func(t *testing.T, l *Layer) // what Open made, when it succeeds
	}{
		{"TOC gzip bomb", []*estargz.TOCEntry{{Name: strings.Repeat("a", MaxTOCJSONBytes), Type: "dir"}}, "TOC decompresses to more than", nil},
		{"negative size", []*estargz.TOCEntry{reg("f", -5, 10)}, "negative size", nil},
		{"negative offset", []*estargz.TOCEntry{reg("f", 10, -5)}, "chunk at blob offset -5 (inner 0, end 10) lies outside the layer data", nil},
		{"negative chunk size", []*estargz.TOCEntry{reg("f", 10, 5, func(e *estargz.TOCEntry) { e.ChunkSize = -1 })}, "entry 0: negative size", nil},
		{"negative chunk size in a chunk entry", []*estargz.TOCEntry{
			reg("f", 10, 5, func(e *estargz.TOCEntry) { e.ChunkSize = 5 }),
			{Name: "f", Type: "chunk", Offset: 7, ChunkOffset: 5, ChunkSize: -5, ChunkDigest: digest.FromString("x").String()},
		}, "entry 1: negative size", nil},
		{"negative offset in a chunk entry", []*estargz.TOCEntry{
			reg("f", 10, 5, func(e *estargz.TOCEntry) { e.ChunkSize = 5 }),
			{Name: "f", Type: "chunk", Offset: -3, ChunkOffset: 5, ChunkSize: 5, ChunkDigest: digest.FromString("x").String()},
		}, "lies outside the layer data", nil},
		{"empty-named regular file", []*estargz.TOCEntry{reg("", 10, 5)}, `an entry of type "reg" has an empty name`, nil},
		{"regular file named /", []*estargz.TOCEntry{{Name: "a", Type: "dir"}, reg("/", 10, 5)}, `an entry of type "reg" has an empty name`, nil},
		{"chunk list of terabytes", []*estargz.TOCEntry{reg("f", 1<<60, 10, func(e *estargz.TOCEntry) { e.ChunkSize = 1 })}, "more than", nil},
		{"chunk outside the blob", []*estargz.TOCEntry{reg("f", 10, 1<<40)}, "outside the layer data", nil},
		{"chunk at offset 0", []*estargz.TOCEntry{reg("f", 10, 0)}, "outside the layer data", nil},
		{"absurd chunk size", []*estargz.TOCEntry{reg("f", 1<<40, 10)}, "exceeds the limit", nil},
		{"absurd inner offset", []*estargz.TOCEntry{reg("f", 10, 10, func(e *estargz.TOCEntry) { e.InnerOffset = 1 << 40 })}, "inner offset", nil},
		{"missing chunk digest", []*estargz.TOCEntry{reg("f", 10, 5, func(e *estargz.TOCEntry) { e.ChunkDigest = "" })}, "no digest", nil},
		{"bad chunk digest", []*estargz.TOCEntry{reg("f", 10, 5, func(e *estargz.TOCEntry) { e.ChunkDigest = "md5:zz" })}, "bad chunk digest", nil},
		{"unknown type", []*estargz.TOCEntry{{Name: "x", Type: "socket"}}, "unknown entry type", nil},
		{"device out of range", []*estargz.TOCEntry{{Name: "d", Type: "char", DevMajor: 1 << 20}}, "out of range", nil},
		{"hardlink to a missing entry", []*estargz.TOCEntry{{Name: "l", Type: "hardlink", LinkName: "nowhere"}}, "not in the layer", nil},
		{"hardlink to a directory", []*estargz.TOCEntry{{Name: "d", Type: "dir"}, {Name: "l", Type: "hardlink", LinkName: "d"}}, "hardlink to a directory", nil},
		{"too deep", deep(MaxDepth + 2), "nested deeper", nil},
		{"dot-dot and absolute names are confined", []*estargz.TOCEntry{{Name: "../../etc", Type: "dir"}, {Name: "/abs", Type: "dir"}}, "", nil},
		// README.md's Trust section: a child of a non-directory is dropped.
		{"child of a non-directory is dropped", []*estargz.TOCEntry{
			{Name: "f", Type: "symlink", LinkName: "x"}, {Name: "f/child", Type: "dir"},
			{Name: "g", Type: "reg"}, {Name: "g/child", Type: "reg"}, {Name: "g/child/deeper", Type: "dir"},
		}, "", func(t *testing.T, l *Layer) {
			if got := names(l.Root()); got != "f|g" {
				t.Errorf("root holds %q, want f|g", got)
			}
			for _, p := range []string{"f", "g"} {
				n, _ := l.Root().Lookup(p)
				if n.IsDir() || len(n.Children()) != 0 {
					t.Errorf("%s: mode %v, children %v; want a childless non-directory", p, n.Mode, n.Children())
				}
			}
			if n, _ := l.Root().Lookup("f"); n.Link != "x" {
				t.Errorf("f -> %q, want x", n.Link)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob, d := handMade(t, tt.entries)
			l, err := Open(context.Background(), blob, WithTOCDigest(d))
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				var walk func(n *Node)
				walk = func(n *Node) {
					for _, c := range n.Children() {
						if !validName(c.Name) {
							t.Errorf("invalid name %q under %s", c.Name, n.Path())
						}
						walk(c.Node)
					}
				}
				walk(l.Root())
				if tt.check != nil {
					tt.check(t, l)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Open = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

func deep(n int) []*estargz.TOCEntry {
	var out []*estargz.TOCEntry
	p := "d"
	for range n {
		out = append(out, &estargz.TOCEntry{Name: p, Type: "dir"})
		p += "/d"
	}
	return out
}

// handMade writes a blob of 10 bytes of gzip'd padding followed by the given
// TOC and an eStargz footer.
func handMade(t *testing.T, entries []*estargz.TOCEntry) (*memBlob, digest.Digest) {
	t.Helper()
	var buf bytes.Buffer
	buf.Write(make([]byte, 10))
	d, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&buf, int64(buf.Len()),
		&estargz.JTOC{Version: 1, Entries: entries}, sha256.New())
	if err != nil {
		t.Fatal(err)
	}
	return &memBlob{data: buf.Bytes()}, d
}

// BenchmarkOpen opens a layer of 20 000 small files in 8 directories, about
// the size of a Debian rootfs with python3: footer, TOC check and parse, and
// the tree.
func BenchmarkOpen(b *testing.B) {
	var entries []lt.Entry
	for d := range 8 {
		dir := fmt.Sprintf("usr/lib/d%d", d)
		entries = append(entries, lt.Dir(dir))
		for f := range 2500 {
			entries = append(entries, lt.FileString(fmt.Sprintf("%s/module_%05d.py", dir, f), fmt.Sprintf("x = %d\n", f)))
		}
	}
	eb, err := lt.Estargz(lt.Tar(entries...))
	if err != nil {
		b.Fatal(err)
	}
	blob := &memBlob{data: eb.Data}
	for b.Loop() {
		if _, err := Open(context.Background(), blob, WithTOCDigest(digest.Digest(eb.TOCDigest)), WithCache(NewCache(16<<20))); err != nil {
			b.Fatal(err)
		}
	}
}

// names joins the names of dir's entries with "|".
func names(dir *Node) string {
	var s []string
	for _, c := range dir.Children() {
		s = append(s, c.Name)
	}
	return strings.Join(s, "|")
}
