package reader

import (
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
)

// OCI whiteout names.
const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// Node is one inode of the layer: a directory, regular file, symlink,
// device, fifo or whiteout. Nodes are immutable after Open. Hardlinked names
// share one Node.
type Node struct {
	Ino    uint64
	Mode   os.FileMode // type and permission bits, setuid/setgid/sticky included
	UID    uint32
	GID    uint32
	Size   int64 // file size; target length for symlinks
	MTime  time.Time
	Nlink  uint32
	Link   string // symlink target
	Major  uint32 // device numbers of character and block devices
	Minor  uint32
	Xattrs map[string][]byte

	name     string   // base name under parent, for messages
	parent   *Node    // first parent; nil for the root
	children []Dirent // directories only, sorted by name
	chunks   []chunk  // regular files only, in file order
}

// Dirent is a named child of a directory.
type Dirent struct {
	Name string
	Node *Node
}

// chunk is a run of a regular file's bytes stored in one gzip member.
type chunk struct {
	off     int64 // offset in the file
	size    int64 // decompressed length
	blobOff int64 // offset of the gzip member in the blob
	blobEnd int64 // end of the compressed bytes to fetch
	inner   int64 // offset of the chunk inside the decompressed member
	digest  digest.Digest
	zstd    bool // a zstd frame (zstd:chunked), not a gzip member
}

// IsDir reports whether n is a directory.
func (n *Node) IsDir() bool { return n.Mode.IsDir() }

// Parent is the directory n was first found in; nil for the root.
func (n *Node) Parent() *Node { return n.parent }

// Children returns a directory's entries sorted by name. Do not modify.
func (n *Node) Children() []Dirent { return n.children }

// Lookup finds a directory's child by name.
func (n *Node) Lookup(name string) (*Node, bool) {
	i := sort.Search(len(n.children), func(i int) bool { return n.children[i].Name >= name })
	if i < len(n.children) && n.children[i].Name == name {
		return n.children[i].Node, true
	}
	return nil, false
}

// Path is a path of n from the layer root, for messages.
func (n *Node) Path() string {
	if n.parent == nil {
		return "/"
	}
	var parts []string
	for m := n; m.parent != nil; m = m.parent {
		parts = append(parts, m.name)
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return "/" + strings.Join(parts, "/")
}

// build turns the parsed TOC into the node tree.
func (l *Layer) build(er *estargz.Reader, opaqueXattr string, verify bool) error {
	// Names are cleaned, so "", ".", "/" and "a/.." all name the root;
	// the last such entry is the root and must be a directory.
	rootEnt, ok := er.Lookup("")
	if !ok {
		return fmt.Errorf("TOC has no root directory")
	}
	if rootEnt.Type != "dir" {
		return fmt.Errorf("TOC has no root directory: an entry of type %q has an empty name (or one that cleans to the root)", rootEnt.Type)
	}
	b := &builder{l: l, er: er, opaqueXattr: opaqueXattr, verify: verify, seen: map[*estargz.TOCEntry]*Node{}}
	root, err := b.node(rootEnt, nil, "")
	if err != nil {
		return err
	}
	l.root = root
	type item struct {
		ent   *estargz.TOCEntry
		node  *Node
		depth int
	}
	stack := []item{{rootEnt, root, 0}}
	for len(stack) > 0 {
		it := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if it.depth > MaxDepth {
			return fmt.Errorf("directory %s is nested deeper than the limit of %d", it.node.Path(), MaxDepth)
		}
		subdirs, err := b.children(it.ent, it.node)
		if err != nil {
			return err
		}
		for i := len(subdirs) - 1; i >= 0; i-- {
			stack = append(stack, item{subdirs[i].ent, subdirs[i].node, it.depth + 1})
		}
	}
	l.nodes = int(b.nextIno)
	l.entries = b.entries
	return nil
}

type builder struct {
	l           *Layer
	er          *estargz.Reader
	opaqueXattr string
	verify      bool                        // every chunk must carry a digest
	seen        map[*estargz.TOCEntry]*Node // hardlink groups share a node
	nextIno     uint64
	entries     int
}

type subdir struct {
	ent  *estargz.TOCEntry
	node *Node
}

// children fills dir's entries from ent's and returns the subdirectories to
// descend into. Only directories are descended into: a TOC entry under a
// non-directory ("f/child" where f is a file or symlink) is dropped, as
// README.md's Trust section documents.
func (b *builder) children(ent *estargz.TOCEntry, dir *Node) ([]subdir, error) {
	type named struct {
		name string
		ent  *estargz.TOCEntry
	}
	var real, whiteouts []named
	opaque := false
	ent.ForeachChild(func(name string, c *estargz.TOCEntry) bool {
		switch {
		case dir.parent == nil && (name == estargz.PrefetchLandmark || name == estargz.NoPrefetchLandmark):
			if name == estargz.PrefetchLandmark {
				b.l.prefetch = c.Offset
			}
		case name == whiteoutOpaque:
			opaque = true
		case strings.HasPrefix(name, whiteoutPrefix):
			if t := name[len(whiteoutPrefix):]; validName(t) {
				whiteouts = append(whiteouts, named{t, c})
			}
		case validName(name):
			real = append(real, named{name, c})
		}
		return true
	})
	if opaque {
		if dir.Xattrs == nil {
			dir.Xattrs = map[string][]byte{}
		}
		dir.Xattrs[b.opaqueXattr] = []byte("y")
	}
	sort.Slice(real, func(i, j int) bool { return real[i].name < real[j].name })
	sort.Slice(whiteouts, func(i, j int) bool { return whiteouts[i].name < whiteouts[j].name })

	var subdirs []subdir
	names := make(map[string]bool, len(real))
	for _, c := range real {
		names[c.name] = true
		if _, dup := b.seen[c.ent]; dup && c.ent.Type == "dir" {
			return nil, fmt.Errorf("%s: a directory with two names (hardlink to a directory)", path.Join(dir.Path(), c.name))
		}
		n, err := b.node(c.ent, dir, c.name)
		if err != nil {
			return nil, err
		}
		if n.IsDir() {
			dir.Nlink++
			subdirs = append(subdirs, subdir{c.ent, n})
		}
		dir.children = append(dir.children, Dirent{c.name, n})
	}
	// A whiteout hides the name in lower layers. A real entry of the same
	// name in this layer takes its place in the overlay anyway, so it wins.
	for _, w := range whiteouts {
		if names[w.name] {
			continue
		}
		names[w.name] = true
		b.nextIno++
		b.entries++
		n := &Node{
			Ino:    b.nextIno,
			Mode:   os.ModeDevice | os.ModeCharDevice,
			MTime:  mtime(w.ent),
			Nlink:  1,
			name:   w.name,
			parent: dir,
		}
		dir.children = append(dir.children, Dirent{w.name, n})
	}
	sort.Slice(dir.children, func(i, j int) bool { return dir.children[i].Name < dir.children[j].Name })
	return subdirs, nil
}

// validName reports whether name can be a directory entry.
func validName(name string) bool {
	return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, "/\x00") && len(name) <= 255
}

// node returns the node for ent, creating it on first sight.
func (b *builder) node(ent *estargz.TOCEntry, parent *Node, name string) (*Node, error) {
	if n, ok := b.seen[ent]; ok {
		n.Nlink++
		return n, nil
	}
	b.entries++
	if b.entries > MaxEntries {
		return nil, fmt.Errorf("TOC has more than %d entries", MaxEntries)
	}
	b.nextIno++
	n := &Node{
		Ino:    b.nextIno,
		UID:    uint32(ent.UID),
		GID:    uint32(ent.GID),
		MTime:  mtime(ent),
		Nlink:  1,
		name:   name,
		parent: parent,
	}
	if ent.UID < 0 || ent.GID < 0 || int64(ent.UID) > 1<<32-1 || int64(ent.GID) > 1<<32-1 {
		return nil, fmt.Errorf("%s: owner %d:%d out of range", path.Join(parentPath(parent), name), ent.UID, ent.GID)
	}
	perm := os.FileMode(ent.Mode & 0o777)
	if ent.Mode&0o4000 != 0 {
		perm |= os.ModeSetuid
	}
	if ent.Mode&0o2000 != 0 {
		perm |= os.ModeSetgid
	}
	if ent.Mode&0o1000 != 0 {
		perm |= os.ModeSticky
	}
	switch ent.Type {
	case "dir":
		n.Mode = os.ModeDir | perm
		n.Nlink = 2
	case "reg":
		n.Mode = perm
		if ent.Size < 0 {
			return nil, fmt.Errorf("%s: negative size %d", n.Path(), ent.Size)
		}
		n.Size = ent.Size
		if err := b.chunks(ent, n); err != nil {
			return nil, err
		}
	case "symlink":
		n.Mode = os.ModeSymlink | perm
		n.Link = ent.LinkName
		n.Size = int64(len(ent.LinkName))
	case "char", "block":
		n.Mode = os.ModeDevice | perm
		if ent.Type == "char" {
			n.Mode |= os.ModeCharDevice
		}
		if ent.DevMajor < 0 || ent.DevMinor < 0 || ent.DevMajor >= 1<<12 || ent.DevMinor >= 1<<20 {
			return nil, fmt.Errorf("%s: device %d:%d out of range", n.Path(), ent.DevMajor, ent.DevMinor)
		}
		n.Major, n.Minor = uint32(ent.DevMajor), uint32(ent.DevMinor)
	case "fifo":
		n.Mode = os.ModeNamedPipe | perm
	default:
		return nil, fmt.Errorf("%s: unknown entry type %q", n.Path(), ent.Type)
	}
	for k, v := range ent.Xattrs {
		// The overlay's own xattrs are never image content: a layer must
		// not be able to redirect or make opaque what the overlay shows,
		// nor (fuse-overlayfs) override owners and modes.
		if strings.HasPrefix(k, "trusted.overlay.") || strings.HasPrefix(k, "user.overlay.") ||
			strings.HasPrefix(k, "user.fuseoverlayfs.") || strings.HasPrefix(k, "user.containers.") {
			continue
		}
		if n.Xattrs == nil {
			n.Xattrs = map[string][]byte{}
		}
		n.Xattrs[k] = v
	}
	b.seen[ent] = n
	return n, nil
}

func parentPath(p *Node) string {
	if p == nil {
		return "/"
	}
	return p.Path()
}

// chunks records where a regular file's bytes are, checking that the TOC's
// chunks tile the file and stay inside the blob's data.
func (b *builder) chunks(ent *estargz.TOCEntry, n *Node) error {
	if ent.Size == 0 {
		return nil
	}
	for off := int64(0); off < ent.Size; {
		c, ok := b.er.ChunkEntryForOffset(ent.Name, off)
		if !ok || c.ChunkOffset != off || c.ChunkSize <= 0 {
			return fmt.Errorf("%s: TOC chunks do not cover byte %d of %d", n.Path(), off, ent.Size)
		}
		size := min(c.ChunkSize, ent.Size-off)
		end := min(c.NextOffset(), b.l.tocOffset)
		switch {
		case size > MaxChunkSize:
			return fmt.Errorf("%s: chunk of %d bytes exceeds the limit of %d", n.Path(), size, MaxChunkSize)
		case c.InnerOffset > MaxChunkSize:
			return fmt.Errorf("%s: chunk inner offset %d exceeds the limit of %d", n.Path(), c.InnerOffset, MaxChunkSize)
		case c.Offset <= 0 || c.Offset >= end || c.InnerOffset < 0:
			return fmt.Errorf("%s: chunk at blob offset %d (inner %d, end %d) lies outside the layer data", n.Path(), c.Offset, c.InnerOffset, end)
		}
		var d digest.Digest
		switch {
		case c.ChunkDigest != "":
			d = digest.Digest(c.ChunkDigest)
		case off == 0 && size == ent.Size && ent.Digest != "":
			d = digest.Digest(ent.Digest)
		}
		if d == "" && b.verify {
			return fmt.Errorf("%s: chunk at byte %d has no digest to verify it with", n.Path(), off)
		}
		if d != "" && !isSHA256(d) {
			if err := d.Validate(); err != nil {
				return fmt.Errorf("%s: bad chunk digest %q: %w", n.Path(), d, err)
			}
		}
		n.chunks = append(n.chunks, chunk{off: off, size: size, blobOff: c.Offset, blobEnd: end, inner: c.InnerOffset, digest: d, zstd: b.l.zstd})
		off += size
		b.entries++
	}
	return nil
}

// isSHA256 reports whether d is a well-formed sha256 digest, the common
// case, without the regular expression Validate runs (a tenth of opening
// a layer of small files).
func isSHA256(d digest.Digest) bool {
	const prefix = "sha256:"
	s := string(d)
	if len(s) != len(prefix)+64 || s[:len(prefix)] != prefix {
		return false
	}
	for i := len(prefix); i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// mtime is the entry's modification time; an absent one is the epoch, as
// a tar header of 0 gives.
func mtime(e *estargz.TOCEntry) time.Time {
	t := e.ModTime()
	if t.IsZero() {
		return time.Unix(0, 0)
	}
	return t
}
