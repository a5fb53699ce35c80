package reader

import (
	"fmt"
	"os"
	"path"
	"slices"
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

// The tree is built from TOC entries as they are decoded, in TOC order,
// reading the TOC as the estargz library's Reader does: names are cleaned,
// a "chunk" entry belongs to the entry before it, a chunk's compressed
// bytes end where the next entry's data starts, missing parent
// directories are made (0755, root), hardlinks resolve to the last entry
// of their target's name, and of entries with one name the last wins.
// Unlike the library's Reader it keeps no entry: each becomes a Node as it
// comes, so a TOC of 200 000 entries is held as the tree alone, not also
// as the library's structs and their index (issue: RSS within budget +
// 64 MiB). Errors about an entry name the entry; the rest of the checks
// run on what the tree reaches from the root.

// tocItem is one non-chunk entry: its node, or for a hardlink its target.
type tocItem struct {
	name string // cleaned
	node *Node  // nil for a hardlink
	link string // a hardlink's target, cleaned
}

// treeBuilder builds a layer's tree; add each entry in TOC order, then
// finish.
type treeBuilder struct {
	l           *Layer
	size        int64 // blob size: where the data of the last entry ends
	opaqueXattr string
	verify      bool // every chunk must carry a digest

	items    []tocItem
	byName   map[string]int32 // index in items of the last entry of each name
	last     *Node            // the last non-chunk entry's node: chunk entries belong to it
	lastSize int64            // size of the last regular file: a chunk's default end
	pending  []pendingChunk   // chunks waiting for the offset their data ends at
	landmark int64            // blob offset of the prefetch landmark
	// The library lists a file's own chunk among its chunks only when the
	// file is chunked (0 < chunkSize < size); chunk entries after a file
	// that is not replace its own when there are two or more. unlisted
	// holds the files with chunk entries whose own chunk is not listed.
	lastListed bool
	unlisted   map[*Node]bool
	bad        map[*Node]string // what is wrong with an entry, told if the tree reaches it

	nextIno uint64
	entries int
}

// pendingChunk is chunk i of a node, its blobEnd not yet known.
type pendingChunk struct {
	n *Node
	i int
}

func newTreeBuilder(l *Layer, size int64, opaqueXattr string, verify bool) *treeBuilder {
	return &treeBuilder{l: l, size: size, opaqueXattr: opaqueXattr, verify: verify, byName: map[string]int32{}}
}

// add takes the next TOC entry. It keeps nothing of e but what it copies.
func (b *treeBuilder) add(e *estargz.TOCEntry) error {
	if len(b.items) >= MaxEntries {
		return fmt.Errorf("TOC has more than %d entries", MaxEntries)
	}
	// The data of every chunk seen since the last entry with data of its
	// own ends where this entry's starts.
	if e.Offset != 0 && e.InnerOffset == 0 {
		for _, p := range b.pending {
			p.n.chunks[p.i].blobEnd = e.Offset
		}
		b.pending = b.pending[:0]
	}
	if e.Type == "chunk" {
		size := e.ChunkSize
		if size == 0 {
			size = b.lastSize - e.ChunkOffset
		}
		if n := b.last; n != nil && n.Mode.IsRegular() && n.Size > 0 {
			if !b.lastListed {
				if b.unlisted == nil {
					b.unlisted = map[*Node]bool{}
				}
				b.unlisted[n] = true
			}
			n.chunks = append(n.chunks, chunk{off: e.ChunkOffset, size: size, blobOff: e.Offset, inner: e.InnerOffset, digest: digest.Digest(e.ChunkDigest)})
			b.pending = append(b.pending, pendingChunk{n, len(n.chunks) - 1})
		}
		return nil
	}
	name := cleanEntryName(e.Name)
	if e.Type == "reg" {
		b.lastSize = e.Size
	}
	it := tocItem{name: name}
	if e.Type == "hardlink" {
		it.link = cleanEntryName(e.LinkName)
	} else {
		n, problem := b.newNode(e)
		if problem != "" {
			// As with the library, an entry the tree never reaches
			// is no error; visit reports one it reaches.
			if b.bad == nil {
				b.bad = map[*Node]string{}
			}
			b.bad[n] = problem
		}
		it.node = n
	}
	b.last = it.node
	b.byName[name] = int32(len(b.items))
	b.items = append(b.items, it)
	if name == estargz.PrefetchLandmark && e.Type == "reg" {
		b.landmark = e.Offset
	}
	return nil
}

// newNode makes the node of entry e, with its chunks as the TOC lists them
// (checked when the tree reaches the node), and says what is wrong with
// the entry, if anything.
func (b *treeBuilder) newNode(e *estargz.TOCEntry) (n *Node, problem string) {
	mt, _ := time.Parse(time.RFC3339, e.ModTime3339)
	if mt.IsZero() {
		mt = time.Unix(0, 0) // as a tar header of 0 gives
	}
	n = &Node{UID: uint32(e.UID), GID: uint32(e.GID), MTime: mt}
	if e.UID < 0 || e.GID < 0 || int64(e.UID) > 1<<32-1 || int64(e.GID) > 1<<32-1 {
		problem = fmt.Sprintf("owner %d:%d out of range", e.UID, e.GID)
	}
	perm := os.FileMode(e.Mode & 0o777)
	if e.Mode&0o4000 != 0 {
		perm |= os.ModeSetuid
	}
	if e.Mode&0o2000 != 0 {
		perm |= os.ModeSetgid
	}
	if e.Mode&0o1000 != 0 {
		perm |= os.ModeSticky
	}
	switch e.Type {
	case "dir":
		n.Mode = os.ModeDir | perm
	case "reg":
		n.Mode = perm
		if e.Size < 0 {
			return n, fmt.Sprintf("negative size %d", e.Size)
		}
		n.Size = e.Size
		if e.Size > 0 {
			// The file's first chunk, or the whole file in one.
			c := chunk{size: e.ChunkSize, blobOff: e.Offset, inner: e.InnerOffset, digest: digest.Digest(e.ChunkDigest)}
			b.lastListed = c.size > 0 && c.size < e.Size
			if !b.lastListed {
				c.size = e.Size
				if c.digest == "" {
					c.digest = digest.Digest(e.Digest)
				}
			}
			c.off = e.ChunkOffset
			n.chunks = []chunk{c}
			b.pending = append(b.pending, pendingChunk{n, 0})
		}
	case "symlink":
		n.Mode = os.ModeSymlink | perm
		n.Link = e.LinkName
		n.Size = int64(len(e.LinkName))
	case "char", "block":
		n.Mode = os.ModeDevice | perm
		if e.Type == "char" {
			n.Mode |= os.ModeCharDevice
		}
		if e.DevMajor < 0 || e.DevMinor < 0 || e.DevMajor >= 1<<12 || e.DevMinor >= 1<<20 {
			problem = fmt.Sprintf("device %d:%d out of range", e.DevMajor, e.DevMinor)
		}
		n.Major, n.Minor = uint32(e.DevMajor), uint32(e.DevMinor)
	case "fifo":
		n.Mode = os.ModeNamedPipe | perm
	default:
		return n, fmt.Sprintf("unknown entry type %q", e.Type)
	}
	for k, v := range e.Xattrs {
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
	return n, problem
}

// typeName is the TOC type of a node of mode m.
func typeName(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "dir"
	case m.IsRegular():
		return "reg"
	case m&os.ModeSymlink != 0:
		return "symlink"
	case m&os.ModeCharDevice != 0:
		return "char"
	case m&os.ModeDevice != 0:
		return "block"
	}
	return "fifo"
}

// cleanEntryName is a TOC entry's name as the estargz library reads it:
// cleaned, relative to the root ("" for the root itself).
func cleanEntryName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// dir returns the node of directory d, making it (and its parents) if no
// entry names it; the node of an entry that is not a directory comes back
// as it is, and gets no children.
func (b *treeBuilder) dir(d string) *Node {
	if i, ok := b.byName[d]; ok {
		return b.items[i].node // nil for a hardlink: no children either
	}
	n := &Node{Mode: os.ModeDir | 0o755, MTime: time.Unix(0, 0)}
	b.byName[d] = int32(len(b.items))
	b.items = append(b.items, tocItem{name: d, node: n})
	if d != "" {
		if p := b.dir(parentDir(d)); p != nil && p.IsDir() {
			p.children = append(p.children, Dirent{path.Base(d), n})
		}
	}
	return n
}

func parentDir(p string) string {
	dir, _ := path.Split(p)
	return strings.TrimSuffix(dir, "/")
}

// resolve follows hardlink item i to the node it names.
func (b *treeBuilder) resolve(i int32) (*Node, error) {
	seen := map[int32]bool{}
	for b.items[i].node == nil {
		if seen[i] {
			return nil, fmt.Errorf("/%s: cyclic hardlink", b.items[i].name)
		}
		seen[i] = true
		j, ok := b.byName[b.items[i].link]
		if !ok {
			return nil, fmt.Errorf("/%s is a hardlink to %q, which is not in the layer", b.items[i].name, b.items[i].link)
		}
		i = j
	}
	return b.items[i].node, nil
}

// finish ends the data of the last chunks at the blob's end, links every
// entry into its directory and walks the tree from the root, numbering
// inodes, counting links and checking what it reaches.
func (b *treeBuilder) finish() error {
	for _, p := range b.pending {
		p.n.chunks[p.i].blobEnd = b.size
	}
	b.pending = nil
	if len(b.items) == 0 {
		b.dir("")
	}
	for i, k := 0, len(b.items); i < k; i++ {
		it := b.items[i]
		if it.name == "" {
			continue // the root
		}
		n := it.node
		if n == nil {
			var err error
			if n, err = b.resolve(int32(i)); err != nil {
				return err
			}
		}
		if p := b.dir(parentDir(it.name)); p != nil && p.IsDir() {
			p.children = append(p.children, Dirent{path.Base(it.name), n})
		}
	}
	// Names are cleaned, so "", ".", "/" and "a/.." all name the root;
	// the last such entry is the root and must be a directory.
	root := b.items[b.byName[""]].node
	if root == nil || !root.IsDir() {
		what := "an entry of type \"hardlink\""
		switch {
		case root != nil && b.bad[root] != "":
			what = "an entry with " + b.bad[root]
		case root != nil:
			what = fmt.Sprintf("an entry of type %q", typeName(root.Mode))
		}
		return fmt.Errorf("TOC has no root directory: %s has an empty name (or one that cleans to the root)", what)
	}
	if err := b.visit(root, nil, ""); err != nil {
		return err
	}
	b.l.root = root
	type item struct {
		node  *Node
		depth int
	}
	stack := []item{{root, 0}}
	for len(stack) > 0 {
		it := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if it.depth > MaxDepth {
			return fmt.Errorf("directory %s is nested deeper than the limit of %d", it.node.Path(), MaxDepth)
		}
		subdirs, err := b.children(it.node)
		if err != nil {
			return err
		}
		for i := len(subdirs) - 1; i >= 0; i-- {
			stack = append(stack, item{subdirs[i], it.depth + 1})
		}
	}
	b.l.nodes = int(b.nextIno)
	b.l.entries = b.entries
	return nil
}

// visit numbers n, first reached as name in parent, and checks its chunks.
func (b *treeBuilder) visit(n *Node, parent *Node, name string) error {
	b.entries++
	if b.entries > MaxEntries {
		return fmt.Errorf("TOC has more than %d entries", MaxEntries)
	}
	b.nextIno++
	n.Ino, n.name, n.parent = b.nextIno, name, parent
	if p := b.bad[n]; p != "" {
		return fmt.Errorf("%s: %s", n.Path(), p)
	}
	n.Nlink = 1
	if n.IsDir() {
		n.Nlink = 2
	}
	if n.Mode.IsRegular() {
		return b.chunks(n)
	}
	return nil
}

// children puts dir's entries in order, with the whiteouts, opaque marker
// and landmarks taken out, and returns the subdirectories to descend
// into. Only directories have children: a TOC entry under a non-directory
// ("f/child" where f is a file or symlink) is dropped, as README.md's
// Trust section documents.
func (b *treeBuilder) children(dir *Node) ([]*Node, error) {
	// Of entries with one name the last wins: a stable sort keeps TOC
	// order among them.
	all := dir.children
	dir.children = nil
	sort.SliceStable(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	var real, whiteouts []Dirent
	opaque := false
	for i, c := range all {
		if i+1 < len(all) && all[i+1].Name == c.Name {
			continue
		}
		name := c.Name
		switch {
		case dir.parent == nil && (name == estargz.PrefetchLandmark || name == estargz.NoPrefetchLandmark):
			if name == estargz.PrefetchLandmark {
				b.l.prefetch = b.landmark
			}
		case name == whiteoutOpaque:
			opaque = true
		case strings.HasPrefix(name, whiteoutPrefix):
			if t := name[len(whiteoutPrefix):]; validName(t) {
				whiteouts = append(whiteouts, Dirent{t, c.Node})
			}
		case validName(name):
			real = append(real, c)
		}
	}
	if opaque {
		if dir.Xattrs == nil {
			dir.Xattrs = map[string][]byte{}
		}
		dir.Xattrs[b.opaqueXattr] = []byte("y")
	}

	var subdirs []*Node
	names := make(map[string]bool, len(real))
	for _, c := range real {
		names[c.Name] = true
		n := c.Node
		if n.Ino != 0 { // a hardlink group's further name
			if n.IsDir() {
				return nil, fmt.Errorf("%s: a directory with two names (hardlink to a directory)", path.Join(dir.Path(), c.Name))
			}
			n.Nlink++
		} else {
			if err := b.visit(n, dir, c.Name); err != nil {
				return nil, err
			}
			if n.IsDir() {
				dir.Nlink++
				subdirs = append(subdirs, n)
			}
		}
		dir.children = append(dir.children, c)
	}
	// A whiteout hides the name in lower layers. A real entry of the same
	// name in this layer takes its place in the overlay anyway, so it wins.
	for _, w := range whiteouts {
		if names[w.Name] {
			continue
		}
		names[w.Name] = true
		b.nextIno++
		b.entries++
		n := &Node{
			Ino:    b.nextIno,
			Mode:   os.ModeDevice | os.ModeCharDevice,
			MTime:  w.Node.MTime,
			Nlink:  1,
			name:   w.Name,
			parent: dir,
		}
		dir.children = append(dir.children, Dirent{w.Name, n})
	}
	sort.Slice(dir.children, func(i, j int) bool { return dir.children[i].Name < dir.children[j].Name })
	dir.children = slices.Clip(dir.children)
	return subdirs, nil
}

// validName reports whether name can be a directory entry.
func validName(name string) bool {
	return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, "/\x00") && len(name) <= 255
}

// chunks checks a regular file's chunks as the TOC listed them: they must
// tile the file from byte 0 and stay inside the blob's data. The first
// chunk at each offset is used, as the estargz library does.
func (b *treeBuilder) chunks(n *Node) error {
	listed := n.chunks
	n.chunks = nil
	if n.Size == 0 {
		return nil
	}
	if b.unlisted[n] {
		if len(listed) > 2 {
			listed = listed[1:] // the chunk entries alone
		} else {
			listed = listed[:1] // one chunk entry: the file's own chunk
		}
	}
	for off := int64(0); off < n.Size; {
		i := sort.Search(len(listed), func(i int) bool {
			c := listed[i]
			return c.off >= off || (off > c.off && off < c.off+c.size)
		})
		if i == len(listed) || listed[i].off != off || listed[i].size <= 0 {
			return fmt.Errorf("%s: TOC chunks do not cover byte %d of %d", n.Path(), off, n.Size)
		}
		c := listed[i]
		c.size = min(c.size, n.Size-off)
		c.blobEnd = min(c.blobEnd, b.l.tocOffset)
		switch {
		case c.size > MaxChunkSize:
			return fmt.Errorf("%s: chunk of %d bytes exceeds the limit of %d", n.Path(), c.size, MaxChunkSize)
		case c.inner > MaxChunkSize:
			return fmt.Errorf("%s: chunk inner offset %d exceeds the limit of %d", n.Path(), c.inner, MaxChunkSize)
		case c.blobOff <= 0 || c.blobOff >= c.blobEnd || c.inner < 0:
			return fmt.Errorf("%s: chunk at blob offset %d (inner %d, end %d) lies outside the layer data", n.Path(), c.blobOff, c.inner, c.blobEnd)
		}
		if c.digest == "" && b.verify {
			return fmt.Errorf("%s: chunk at byte %d has no digest to verify it with", n.Path(), off)
		}
		if c.digest != "" && !isSHA256(c.digest) {
			if err := c.digest.Validate(); err != nil {
				return fmt.Errorf("%s: bad chunk digest %q: %w", n.Path(), c.digest, err)
			}
		}
		c.zstd = b.l.zstd
		n.chunks = append(n.chunks, c)
		off += c.size
		b.entries++
	}
	n.chunks = slices.Clip(n.chunks)
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
