// Package unpack turns an OCI layer tar into a directory that overlayfs can
// use as a lower layer, and keeps such directories in a shared on-disk store.
//
// Whiteouts become what overlayfs reads: ".wh.NAME" a 0/0 character device
// NAME, ".wh..wh..opq" the xattr trusted.overlay.opaque=y on its directory.
// Ownership, modes (setuid, setgid, sticky), xattrs, devices, fifos, hard and
// symbolic links and mtimes are kept (overlay xattrs of the image are
// dropped, so a layer cannot steer the overlay). Every path is resolved inside the layer
// directory with openat2(RESOLVE_IN_ROOT): "..", absolute names and symlinks
// pointing out of the layer cannot reach anything outside it.
package unpack

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	// overlayXattrPrefix and userOverlayXattrPrefix name the xattrs that
	// steer overlayfs (the latter with userxattr); a layer's own are
	// dropped so that it cannot.
	overlayXattrPrefix     = "trusted.overlay."
	userOverlayXattrPrefix = "user.overlay."
	xattrPAXPrefix         = "SCHILY.xattr."
)

// Option configures Tar and NewStore.
type Option func(*config)

type config struct {
	opaqueXattr   string
	fileWhiteouts bool
}

// WithOpaqueXattr sets the xattr that marks opaque directories. The
// default is "trusted.overlay.opaque" (kernel overlayfs); fuse-overlayfs
// run unprivileged reads "user.overlay.opaque".
func WithOpaqueXattr(name string) Option { return func(c *config) { c.opaqueXattr = name } }

// WithFileWhiteouts keeps whiteouts as the empty ".wh.NAME" and
// ".wh..wh..opq" files of the layer (which fuse-overlayfs understands)
// instead of 0/0 character devices, which need CAP_MKNOD. Off by default.
func WithFileWhiteouts(b bool) Option { return func(c *config) { c.fileWhiteouts = b } }

func newConfig(opts []Option) config {
	c := config{opaqueXattr: "trusted.overlay.opaque"}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// Tar unpacks the uncompressed layer tar read from r into dir, an existing
// directory. Entries that name the layer root ("", ".", "/") set the root's
// metadata. Tar stops at the first error; dir then holds a partial layer.
// Run unprivileged, it keeps the caller as owner and skips device nodes
// and xattrs outside the user.* namespace, which need privileges.
func Tar(r io.Reader, dir string, opts ...Option) error {
	root, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open layer directory %s: %w", dir, err)
	}
	defer unix.Close(root)
	u := &unpacker{root: root, root0: os.Geteuid() == 0, cfg: newConfig(opts)}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer tar: %w", err)
		}
		if err := u.entry(h, tr); err != nil {
			return fmt.Errorf("unpack %q: %w", h.Name, err)
		}
	}
	return u.finish()
}

type unpacker struct {
	root  int  // the layer directory
	root0 bool // running as root: ownership and devices can be set
	cfg   config
	dirs  []dirTime
}

// dirTime is a directory mtime to set once nothing more is written into it.
type dirTime struct {
	name  string
	mtime time.Time
}

// clean maps a tar name into the layer: "" for the root, else a relative
// path without "." or ".." components.
func clean(name string) string {
	p := path.Clean("/" + name)
	return strings.TrimPrefix(p, "/")
}

// openDir opens directory rel (root-relative, "" for the root) for use as a
// dirfd, resolving symlinks as if the layer were the root of the file
// system. With create, missing directories are made (0755, owned by root).
func (u *unpacker) openDir(rel string, create bool) (int, error) {
	if rel == "" {
		return unix.Dup(u.root)
	}
	how := unix.OpenHow{Flags: unix.O_DIRECTORY | unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS}
	fd, err := unix.Openat2(u.root, rel, &how)
	if err == nil || !create || !errors.Is(err, unix.ENOENT) {
		if err != nil {
			return -1, fmt.Errorf("directory %s: %w", rel, err)
		}
		return fd, nil
	}
	parent, base := path.Split(rel)
	pfd, err := u.openDir(strings.TrimSuffix(parent, "/"), true)
	if err != nil {
		return -1, err
	}
	defer unix.Close(pfd)
	if err := unix.Mkdirat(pfd, base, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, fmt.Errorf("mkdir %s: %w", rel, err)
	}
	fd, err = unix.Openat2(u.root, rel, &how)
	if err != nil {
		return -1, fmt.Errorf("directory %s: %w", rel, err)
	}
	return fd, nil
}

func (u *unpacker) entry(h *tar.Header, body io.Reader) error {
	rel := clean(h.Name)
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")

	if rel == "" {
		if h.Typeflag != tar.TypeDir {
			return errors.New("the layer root is not a directory")
		}
		if u.root0 {
			if err := unix.Fchown(u.root, h.Uid, h.Gid); err != nil {
				return err
			}
		}
		if err := unix.Fchmod(u.root, modeBits(h.Mode)); err != nil {
			return err
		}
		// The root's path is the /proc magic link itself, which only
		// Setxattr follows to the directory (Lsetxattr would act on the
		// link); nothing of the layer is resolved on the way.
		if err := setXattrs(fdPath(u.root, ""), true, h); err != nil {
			return err
		}
		u.dirs = append(u.dirs, dirTime{"", h.ModTime})
		return nil
	}

	pfd, err := u.openDir(dir, true)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)

	switch {
	case base == opaqueMarker:
		if u.cfg.fileWhiteouts {
			if err := u.emptyFile(pfd, base); err != nil {
				return err
			}
		}
		return unix.Setxattr(fdPath(pfd, ""), u.cfg.opaqueXattr, []byte("y"), 0)
	case strings.HasPrefix(base, whiteoutPrefix+whiteoutPrefix):
		return nil // other AUFS metadata (.wh..wh..plnk etc.)
	case strings.HasPrefix(base, whiteoutPrefix):
		name := strings.TrimPrefix(base, whiteoutPrefix)
		if name == "" || name == "." || name == ".." {
			return nil
		}
		if err := removeExisting(pfd, name, false); err != nil {
			return err
		}
		if u.cfg.fileWhiteouts {
			return u.emptyFile(pfd, base)
		}
		if err := unix.Mknodat(pfd, name, unix.S_IFCHR, 0); err != nil {
			return fmt.Errorf("whiteout: %w", err)
		}
		return nil
	}

	if err := removeExisting(pfd, base, h.Typeflag == tar.TypeDir); err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		u.dirs = append(u.dirs, dirTime{rel, h.ModTime})
		return u.meta(pfd, base, h, false)
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse:
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(fd), base)
		_, err = io.Copy(f, body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(h.Linkname, pfd, base); err != nil {
			return err
		}
	case tar.TypeLink:
		target := clean(h.Linkname)
		if target == "" {
			return fmt.Errorf("hard link to the layer root")
		}
		tdir, tbase := path.Split(target)
		tfd, err := u.openDir(strings.TrimSuffix(tdir, "/"), false)
		if err != nil {
			return fmt.Errorf("hard link target %q: %w", h.Linkname, err)
		}
		defer unix.Close(tfd)
		var st unix.Stat_t
		if err := unix.Fstatat(tfd, tbase, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("hard link target %q: %w", h.Linkname, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return fmt.Errorf("hard link to directory %q", h.Linkname)
		}
		if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
			return err
		}
		return nil // a hard link shares its target's metadata
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		mode := uint32(unix.S_IFIFO)
		switch h.Typeflag {
		case tar.TypeChar:
			mode = unix.S_IFCHR
		case tar.TypeBlock:
			mode = unix.S_IFBLK
		}
		dev := int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor)))
		if err := unix.Mknodat(pfd, base, mode|0o600, dev); err != nil {
			if !u.root0 && errors.Is(err, unix.EPERM) && h.Typeflag != tar.TypeFifo {
				return nil // devices need CAP_MKNOD: left out, as rootless unpackers do
			}
			return err
		}
	default:
		return nil // tar-internal or unknown entry types carry no file
	}
	return u.meta(pfd, base, h, h.Typeflag != tar.TypeDir)
}

// emptyFile creates an empty mode-0 file base in pfd (a whiteout marker).
func (u *unpacker) emptyFile(pfd int, base string) error {
	if err := removeExisting(pfd, base, false); err != nil {
		return err
	}
	fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("whiteout: %w", err)
	}
	return unix.Close(fd)
}

// removeExisting makes room for a new entry named base: a later entry
// replaces an earlier one, except that a directory over a directory merges.
func removeExisting(pfd int, base string, keepDir bool) error {
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return unix.Unlinkat(pfd, base, 0)
	}
	if keepDir {
		return nil
	}
	return removeAllAt(pfd, base)
}

// removeAllAt removes directory base of pfd and everything under it
// without following symlinks.
func removeAllAt(pfd int, base string) error {
	fd, err := unix.Openat(pfd, base, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), base)
	names, err := f.Readdirnames(-1)
	if err != nil {
		f.Close()
		return err
	}
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			f.Close()
			return err
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = removeAllAt(fd, n)
		} else {
			err = unix.Unlinkat(fd, n, 0)
		}
		if err != nil {
			f.Close()
			return err
		}
	}
	f.Close()
	return unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR)
}

// meta sets owner, mode, xattrs and (unless deferred for directories) the
// mtime of base in pfd.
func (u *unpacker) meta(pfd int, base string, h *tar.Header, times bool) error {
	if u.root0 {
		if err := unix.Fchownat(pfd, base, h.Uid, h.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown: %w", err)
		}
	}
	if h.Typeflag != tar.TypeSymlink {
		// After chown, which clears setuid and setgid.
		if err := unix.Fchmodat(pfd, base, modeBits(h.Mode), 0); err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
	}
	if err := setXattrs(fdPath(pfd, base), false, h); err != nil {
		return err
	}
	if times {
		ts := []unix.Timespec{unix.NsecToTimespec(h.AccessTime.UnixNano()), unix.NsecToTimespec(h.ModTime.UnixNano())}
		if h.AccessTime.IsZero() {
			ts[0] = ts[1]
		}
		if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("set mtime: %w", err)
		}
	}
	return nil
}

// modeBits maps tar mode bits to chmod's.
func modeBits(m int64) uint32 {
	b := uint32(m & 0o777)
	if m&0o4000 != 0 {
		b |= unix.S_ISUID
	}
	if m&0o2000 != 0 {
		b |= unix.S_ISGID
	}
	if m&0o1000 != 0 {
		b |= unix.S_ISVTX
	}
	return b
}

// fdPath names base inside the directory open as fd, for calls that have
// no *at form. base itself is not followed by the l* calls that use it.
func fdPath(fd int, base string) string {
	p := fmt.Sprintf("/proc/self/fd/%d", fd)
	if base != "" {
		p += "/" + base
	}
	return p
}

// setXattrs sets h's xattrs on p. With follow, p's last component is
// followed (Setxattr): for fdPath(fd, ""), which names the magic link of
// the directory itself; else it is not (Lsetxattr), so that a layer's
// symlink is not written through.
func setXattrs(p string, follow bool, h *tar.Header) error {
	set := unix.Lsetxattr
	if follow {
		set = unix.Setxattr
	}
	keys := make([]string, 0, len(h.PAXRecords))
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, xattrPAXPrefix) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		name := strings.TrimPrefix(k, xattrPAXPrefix)
		if strings.HasPrefix(name, overlayXattrPrefix) || strings.HasPrefix(name, userOverlayXattrPrefix) {
			continue
		}
		if err := set(p, name, []byte(h.PAXRecords[k]), 0); err != nil {
			if (errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOTSUP)) && h.Typeflag != tar.TypeReg && h.Typeflag != tar.TypeDir {
				continue // user.* xattrs are not allowed on symlinks and devices
			}
			if errors.Is(err, unix.EPERM) && os.Geteuid() != 0 && !strings.HasPrefix(name, "user.") {
				continue // trusted.* and security.* need privileges
			}
			return fmt.Errorf("set xattr %s: %w", name, err)
		}
	}
	return nil
}

// finish sets directory mtimes now that their contents are complete.
// (Setting a directory's times does not touch its parent's.)
func (u *unpacker) finish() error {
	seen := map[string]bool{}
	for i := len(u.dirs) - 1; i >= 0; i-- { // the last entry for a name wins
		d := u.dirs[i]
		if seen[d.name] {
			continue
		}
		seen[d.name] = true
		ts := []unix.Timespec{unix.NsecToTimespec(d.mtime.UnixNano()), unix.NsecToTimespec(d.mtime.UnixNano())}
		if d.name == "" {
			if err := unix.UtimesNano(fdPath(u.root, ""), ts); err != nil {
				return fmt.Errorf("set mtime of the layer root: %w", err)
			}
			continue
		}
		dir, base := path.Split(d.name)
		pfd, err := u.openDir(strings.TrimSuffix(dir, "/"), false)
		if err != nil {
			continue // replaced by a later entry
		}
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW)
			if err != nil {
				unix.Close(pfd)
				return fmt.Errorf("set mtime of %q: %w", d.name, err)
			}
		}
		unix.Close(pfd)
	}
	return nil
}
