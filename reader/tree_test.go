package reader

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
)

// The estargz library's Reader is the reference reading of a TOC; the
// tree builder reads TOCs its own way to keep no entry (tree.go).
// FuzzTree holds the two to each other.

// parsedTOC is an estargz.Decompressor that hands the library a TOC
// already decoded.
type parsedTOC struct{ toc *estargz.JTOC }

func (p *parsedTOC) Reader(r io.Reader) (io.ReadCloser, error) { return io.NopCloser(r), nil }
func (p *parsedTOC) FooterSize() int64                         { return 0 }
func (p *parsedTOC) ParseFooter([]byte) (int64, int64, int64, error) {
	return 0, -1, 0, nil // the TOC is "elsewhere": ParseTOC(nil) returns it
}
func (p *parsedTOC) ParseTOC(io.Reader) (*estargz.JTOC, digest.Digest, error) {
	return p.toc, "", nil
}
func (p *parsedTOC) DecompressTOC(io.Reader) (io.ReadCloser, error) {
	return nil, fmt.Errorf("not supported")
}

// zeros is a ReaderAt of zero bytes: the library reads a footer from it
// and finds none but parsedTOC's.
type zeros struct{}

func (zeros) ReadAt(p []byte, _ int64) (int, error) {
	clear(p)
	return len(p), nil
}

// libraryTree opens toc with the estargz library.
func libraryTree(size int64, toc *estargz.JTOC) (r *estargz.Reader, err error) {
	defer recoverInto(&err)
	return estargz.Open(io.NewSectionReader(zeros{}, 0, size), estargz.WithDecompressors(&parsedTOC{toc}))
}

// compareTree checks our tree at dir against the library's at ent.
func compareTree(t *testing.T, er *estargz.Reader, dir *Node, ent *estargz.TOCEntry, dup map[string]bool, tocOffset int64) {
	t.Helper()
	real := map[string]*estargz.TOCEntry{}
	whiteouts := map[string]bool{}
	opaque := false
	ent.ForeachChild(func(name string, c *estargz.TOCEntry) bool {
		switch {
		case dir.parent == nil && (name == estargz.PrefetchLandmark || name == estargz.NoPrefetchLandmark):
		case name == whiteoutOpaque:
			opaque = true
		case strings.HasPrefix(name, whiteoutPrefix):
			if w := name[len(whiteoutPrefix):]; validName(w) {
				whiteouts[w] = true
			}
		case validName(name):
			real[name] = c
		}
		return true
	})
	if got := string(dir.Xattrs["trusted.overlay.opaque"]) == "y"; got != opaque {
		t.Fatalf("%s: opaque %v, library %v", dir.Path(), got, opaque)
	}
	for _, c := range dir.Children() {
		if _, ok := real[c.Name]; !ok && !whiteouts[c.Name] {
			t.Fatalf("%s: %s is not in the library's tree", dir.Path(), c.Name)
		}
	}
	for name, e := range real {
		n, ok := dir.Lookup(name)
		if !ok {
			t.Fatalf("%s: library has %s, the tree does not", dir.Path(), name)
		}
		compareNode(t, er, n, e, dup, tocOffset)
		if n.IsDir() && n.Parent() == dir {
			compareTree(t, er, n, e, dup, tocOffset)
		}
	}
	for name := range whiteouts {
		if _, ok := real[name]; ok {
			continue
		}
		n, ok := dir.Lookup(name)
		if !ok || n.Mode.Type() != os.ModeDevice|os.ModeCharDevice || n.Major != 0 || n.Minor != 0 {
			t.Fatalf("%s: whiteout %s missing or not 0:0", dir.Path(), name)
		}
	}
}

func compareNode(t *testing.T, er *estargz.Reader, n *Node, e *estargz.TOCEntry, dup map[string]bool, tocOffset int64) {
	t.Helper()
	types := map[string]os.FileMode{"dir": os.ModeDir, "reg": 0, "symlink": os.ModeSymlink, "char": os.ModeDevice | os.ModeCharDevice,
		"block": os.ModeDevice, "fifo": os.ModeNamedPipe}
	want := time.Unix(0, 0)
	if !e.ModTime().IsZero() {
		want = e.ModTime()
	}
	switch {
	case n.Mode.Type() != types[e.Type]:
		t.Fatalf("%s: type %v, library %q", n.Path(), n.Mode.Type(), e.Type)
	case int64(n.Mode.Perm()) != e.Mode&0o777 || (n.Mode&os.ModeSetuid != 0) != (e.Mode&0o4000 != 0) ||
		(n.Mode&os.ModeSetgid != 0) != (e.Mode&0o2000 != 0) || (n.Mode&os.ModeSticky != 0) != (e.Mode&0o1000 != 0):
		t.Fatalf("%s: mode %v, library %o", n.Path(), n.Mode, e.Mode)
	case int(n.UID) != e.UID || int(n.GID) != e.GID:
		t.Fatalf("%s: owner %d:%d, library %d:%d", n.Path(), n.UID, n.GID, e.UID, e.GID)
	case !n.MTime.Equal(want):
		t.Fatalf("%s: mtime %v, library %v", n.Path(), n.MTime, want)
	case e.Type == "reg" && n.Size != e.Size, e.Type == "symlink" && n.Link != e.LinkName:
		t.Fatalf("%s: size %d link %q, library %d %q", n.Path(), n.Size, n.Link, e.Size, e.LinkName)
	case (e.Type == "char" || e.Type == "block") && (int(n.Major) != e.DevMajor || int(n.Minor) != e.DevMinor):
		t.Fatalf("%s: device %d:%d, library %d:%d", n.Path(), n.Major, n.Minor, e.DevMajor, e.DevMinor)
	}
	if e.Type != "reg" || dup[e.Name] {
		return // the library mixes the chunk lists of entries sharing a name
	}
	off := int64(0)
	for _, c := range n.chunks {
		lc, ok := er.ChunkEntryForOffset(e.Name, off)
		if !ok || lc.ChunkOffset != off || c.blobOff != lc.Offset || c.inner != lc.InnerOffset ||
			c.size != min(lc.ChunkSize, e.Size-off) || c.blobEnd != min(lc.NextOffset(), tocOffset) {
			t.Fatalf("%s: chunk at %d: %+v, library %+v (found %v)", n.Path(), off, c, lc, ok)
		}
		off += c.size
	}
	if off != n.Size {
		t.Fatalf("%s: chunks cover %d of %d bytes", n.Path(), off, n.Size)
	}
}

// FuzzTree: wherever both the tree builder and the estargz library read a
// TOC, every name the tree shows is in the library's tree with the same
// type, mode, owner, mtime, size, link target, device numbers and chunks
// (whiteouts, opaque markers and landmarks turned into what an overlay
// wants), and every name of the library's tree is in ours.
func FuzzTree(f *testing.F) {
	for _, s := range []string{
		`{"version":1,"entries":[{"name":"./","type":"dir","mode":493},{"name":"a/b/c","type":"reg","size":10,"offset":100,"chunkSize":4},{"name":"a/b/c","type":"chunk","offset":200,"chunkOffset":4,"chunkSize":4},{"name":"a/b/c","type":"chunk","offset":300,"chunkOffset":8},{"name":"h","type":"hardlink","linkName":"a/b/c"},{"name":"a/.wh.x","type":"reg"},{"name":"a/.wh..wh..opq","type":"reg"}]}`,
		`{"version":1,"entries":[{"name":"d/","type":"dir","mode":1023,"uid":3,"gid":4,"modtime":"2020-01-02T03:04:05Z"},{"name":"d/s","type":"symlink","linkName":"../x"},{"name":"d/c","type":"char","devMajor":1,"devMinor":3},{"name":".prefetch.landmark","type":"reg","size":1,"offset":400},{"name":"f","type":"reg","size":5,"offset":500,"innerOffset":7}]}`,
		`{"version":1,"entries":[{"name":"x","type":"reg","size":3,"offset":10},{"name":"x","type":"dir"},{"name":"x/y","type":"fifo"},{"name":"../../z","type":"reg","size":2,"offset":20,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, tocJSON []byte) {
		toc, err := parseTOC(tocJSON)
		if err != nil {
			return
		}
		const size, tocOffset = 1 << 20, 1<<20 - 100
		l := &Layer{tocOffset: tocOffset}
		b := newTreeBuilder(l, size, "trusted.overlay.opaque", false)
		dup, seen := map[string]bool{}, map[string]bool{}
		for _, e := range toc.Entries {
			if e.Type != "chunk" {
				name := cleanEntryName(e.Name)
				dup[name], seen[name] = seen[name], true
			}
			if err := b.add(e); err != nil {
				return
			}
		}
		if b.finish() != nil {
			return
		}
		// The library changes the entries it reads: give it its own.
		js, _ := json.Marshal(toc)
		var own estargz.JTOC
		json.Unmarshal(js, &own)
		er, err := libraryTree(size, &own)
		if err != nil {
			t.Fatalf("the tree builder read a TOC the library refuses: %v", err)
		}
		root, ok := er.Lookup("")
		if !ok {
			t.Fatal("library tree has no root")
		}
		compareNode(t, er, l.root, root, dup, tocOffset)
		compareTree(t, er, l.root, root, dup, tocOffset)
	})
}
