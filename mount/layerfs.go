// Package mount serves eStargz layers read-only through FUSE and stacks them
// with overlayfs into one root filesystem.
//
// LayerFS is the FUSE file system of one reader.Layer; files read whole are
// handed to the kernel as saved copies on later opens (FUSE passthrough,
// passthrough.go). Mount mounts a list of layers under a per-mount state
// directory and an overlay of them at the target; Unmount tears such a
// stack down, also after its server was killed.
package mount

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"sort"
	"syscall"
	"time"

	"bazil.org/fuse"
	"bazil.org/fuse/fs"
	"golang.org/x/sys/unix"

	"github.com/stargz-mount/stargz-mount/reader"
)

// cacheTimeout is how long the kernel may keep entries and attributes.
// Layers are immutable, so this only bounds kernel memory, not staleness.
const cacheTimeout = 24 * time.Hour

// LayerFS is a read-only FUSE file system serving one layer.
type LayerFS struct {
	layer  *reader.Layer
	logger *slog.Logger
	pt     *passthrough // nil: every read goes through the daemon
}

// NewLayerFS returns the file system of l, logging failed reads to logger.
func NewLayerFS(l *reader.Layer, logger *slog.Logger) *LayerFS {
	if logger == nil {
		logger = slog.Default()
	}
	return &LayerFS{layer: l, logger: logger}
}

// Close waits for the file saving that passthrough started (see
// passthrough.go). Call it once the file system is no longer served.
func (f *LayerFS) Close() {
	if f.pt != nil {
		f.pt.close()
	}
}

var (
	_ fs.FS         = (*LayerFS)(nil)
	_ fs.FSStatfser = (*LayerFS)(nil)
)

// Root implements fs.FS.
func (f *LayerFS) Root() (fs.Node, error) { return node{f, f.layer.Root()}, nil }

// Statfs implements fs.FSStatfser. Namelen must be set: overlayfs refuses
// every lookup on a lower whose name length limit reads as 0.
func (f *LayerFS) Statfs(ctx context.Context, req *fuse.StatfsRequest, resp *fuse.StatfsResponse) error {
	resp.Bsize = 4096
	resp.Frsize = 4096
	resp.Namelen = 255
	resp.Files = uint64(f.layer.Nodes())
	return nil
}

// node is one inode of the layer. It is a comparable value, so bazil's
// node table maps each reader.Node to one FUSE node ID however often it is
// looked up, and hardlinked names share it.
type node struct {
	fs *LayerFS
	n  *reader.Node
}

var (
	_ fs.Node                = node{}
	_ fs.NodeRequestLookuper = node{}
	_ fs.HandleReadDirAller  = node{}
	_ fs.NodeOpener          = node{}
	_ fs.HandleReader        = node{}
	_ fs.NodeReadlinker      = node{}
	_ fs.NodeGetxattrer      = node{}
	_ fs.NodeListxattrer     = node{}
)

// Attr implements fs.Node.
func (n node) Attr(ctx context.Context, a *fuse.Attr) error {
	r := n.n
	a.Valid = cacheTimeout
	a.Inode = r.Ino
	a.Size = uint64(r.Size)
	a.Blocks = (uint64(r.Size) + 511) / 512
	a.BlockSize = 4096
	a.Mode = r.Mode
	a.Nlink = r.Nlink
	a.Uid = r.UID
	a.Gid = r.GID
	a.Mtime = r.MTime
	a.Ctime = r.MTime
	a.Atime = r.MTime
	if r.Mode&os.ModeDevice != 0 {
		a.Rdev = uint32(unix.Mkdev(r.Major, r.Minor))
	}
	return nil
}

// Lookup implements fs.NodeRequestLookuper.
func (n node) Lookup(ctx context.Context, req *fuse.LookupRequest, resp *fuse.LookupResponse) (fs.Node, error) {
	n.fs.layer.Touch()
	c, ok := n.n.Lookup(req.Name)
	if !ok {
		return nil, syscall.ENOENT
	}
	resp.EntryValid = cacheTimeout
	return node{n.fs, c}, nil
}

// ReadDirAll implements fs.HandleReadDirAller.
func (n node) ReadDirAll(ctx context.Context) ([]fuse.Dirent, error) {
	n.fs.layer.Touch()
	if !n.n.IsDir() {
		return nil, syscall.ENOTDIR
	}
	kids := n.n.Children()
	out := make([]fuse.Dirent, 0, len(kids)+2)
	parent := n.n
	if p := n.n.Parent(); p != nil {
		parent = p
	}
	out = append(out,
		fuse.Dirent{Inode: n.n.Ino, Name: ".", Type: fuse.DT_Dir},
		fuse.Dirent{Inode: parent.Ino, Name: "..", Type: fuse.DT_Dir})
	for _, k := range kids {
		out = append(out, fuse.Dirent{Inode: k.Node.Ino, Name: k.Name, Type: direntType(k.Node.Mode)})
	}
	return out, nil
}

func direntType(m os.FileMode) fuse.DirentType {
	switch {
	case m.IsDir():
		return fuse.DT_Dir
	case m&os.ModeSymlink != 0:
		return fuse.DT_Link
	case m&os.ModeCharDevice != 0:
		return fuse.DT_Char
	case m&os.ModeDevice != 0:
		return fuse.DT_Block
	case m&os.ModeNamedPipe != 0:
		return fuse.DT_FIFO
	case m&os.ModeSocket != 0:
		return fuse.DT_Socket
	}
	return fuse.DT_File
}

// Open implements fs.NodeOpener. Content never changes, so the kernel keeps
// its page cache across opens.
func (n node) Open(ctx context.Context, req *fuse.OpenRequest, resp *fuse.OpenResponse) (fs.Handle, error) {
	n.fs.layer.Touch()
	if !req.Flags.IsReadOnly() {
		return nil, syscall.EROFS
	}
	if n.n.IsDir() {
		return n, nil
	}
	if pt := n.fs.pt; pt != nil && pt.wants(n.n) {
		return pt.open(n, resp), nil
	}
	resp.Flags |= fuse.OpenKeepCache
	return n, nil
}

// Read implements fs.HandleReader. Failures are logged here, once, and
// reach the caller as EIO.
func (n node) Read(ctx context.Context, req *fuse.ReadRequest, resp *fuse.ReadResponse) error {
	n.fs.layer.Touch()
	// Most reads lie within one chunk: answer with the cached chunk's
	// bytes, uncopied (bazil copies them into its reply).
	data, err := n.fs.layer.ReadSlice(ctx, n.n, req.Offset, req.Size)
	if err != nil && err != io.EOF {
		if errors.Is(err, context.Canceled) {
			return syscall.EINTR
		}
		n.fs.logger.Error("read failed", "layer", n.fs.layer.Name(), "path", n.n.Path(),
			"offset", req.Offset, "size", req.Size, "err", err)
		return syscall.EIO
	}
	resp.Data = data
	return nil
}

// Readlink implements fs.NodeReadlinker.
func (n node) Readlink(ctx context.Context, req *fuse.ReadlinkRequest) (string, error) {
	if n.n.Mode&os.ModeSymlink == 0 {
		return "", syscall.EINVAL
	}
	return n.n.Link, nil
}

// Getxattr implements fs.NodeGetxattrer.
func (n node) Getxattr(ctx context.Context, req *fuse.GetxattrRequest, resp *fuse.GetxattrResponse) error {
	v, ok := n.n.Xattrs[req.Name]
	if !ok {
		return fuse.ErrNoXattr
	}
	resp.Xattr = append([]byte(nil), v...)
	return nil
}

// Listxattr implements fs.NodeListxattrer.
func (n node) Listxattr(ctx context.Context, req *fuse.ListxattrRequest, resp *fuse.ListxattrResponse) error {
	names := make([]string, 0, len(n.n.Xattrs))
	for k := range n.n.Xattrs {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		resp.Append(k)
	}
	return nil
}
