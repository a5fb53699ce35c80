package layertest

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// node is what CompareTrees records about one path.
type node struct {
	st     unix.Stat_t
	target string            // symlink target
	xattrs map[string]string // user.* only
}

type tree struct {
	root  string
	nodes map[string]*node
	links map[string][]string // path -> sorted paths sharing its inode (non-dirs)
}

// CompareTrees walks want and got without following symlinks and returns
// human-readable differences, with paths relative to the roots: missing and
// extra paths, file type, permission bits (incl. setuid, setgid, sticky),
// uid, gid, size and sha256 of regular files, symlink targets, device
// numbers, user.* xattrs, mtime (seconds) and hard-link grouping. The roots
// themselves are not compared, and root-level names in ignore are skipped
// with their subtrees (see FormatFiles).
//
// Directory mtimes are compared too: umoci restores a directory's mtime
// after creating or whiting out its children, and an overlay shows the
// topmost layer's directory, so they agree as long as every layer lists each
// directory it touches (as the corpus does).
func CompareTrees(want, got string, ignore ...string) []string {
	w, err := scanTree(want, ignore)
	if err != nil {
		return []string{fmt.Sprintf("scanning want: %v", err)}
	}
	g, err := scanTree(got, ignore)
	if err != nil {
		return []string{fmt.Sprintf("scanning got: %v", err)}
	}
	var diffs []string
	seen := map[string]bool{}
	for _, p := range slices.Sorted(maps.Keys(w.nodes)) {
		wn, gn := w.nodes[p], g.nodes[p]
		if gn == nil {
			diffs = append(diffs, p+": missing")
			continue
		}
		d := compareNode(w, g, p, wn, gn)
		if wl, gl := w.links[p], g.links[p]; wl != nil && gl != nil && !slices.Equal(wl, gl) {
			// Report each mismatching pair of groups once.
			if msg := fmt.Sprintf("hard links: want %q, got %q", wl, gl); !seen[msg] {
				seen[msg] = true
				d = append(d, msg)
			}
		}
		for _, s := range d {
			diffs = append(diffs, p+": "+s)
		}
	}
	for _, p := range slices.Sorted(maps.Keys(g.nodes)) {
		if w.nodes[p] == nil {
			diffs = append(diffs, p+": extra")
		}
	}
	return diffs
}

func compareNode(w, g *tree, p string, wn, gn *node) []string {
	var d []string
	diff := func(what string, want, got any) {
		if want != got {
			d = append(d, fmt.Sprintf("%s: want %v, got %v", what, want, got))
		}
	}
	wt, gt := wn.st.Mode&unix.S_IFMT, gn.st.Mode&unix.S_IFMT
	if wt != gt {
		return []string{fmt.Sprintf("type: want %s, got %s", typeName(wt), typeName(gt))}
	}
	diff("mode", fmt.Sprintf("%04o", wn.st.Mode&0o7777), fmt.Sprintf("%04o", gn.st.Mode&0o7777))
	diff("uid", wn.st.Uid, gn.st.Uid)
	diff("gid", wn.st.Gid, gn.st.Gid)
	diff("mtime", mtime(&wn.st), mtime(&gn.st))
	switch wt {
	case unix.S_IFREG:
		diff("size", wn.st.Size, gn.st.Size)
		if wn.st.Size == gn.st.Size {
			diff("sha256", fileSum(filepath.Join(w.root, p)), fileSum(filepath.Join(g.root, p)))
		}
	case unix.S_IFLNK:
		diff("symlink target", wn.target, gn.target)
	case unix.S_IFCHR, unix.S_IFBLK:
		diff("rdev", devString(wn.st.Rdev), devString(gn.st.Rdev))
	}
	for _, k := range slices.Sorted(maps.Keys(wn.xattrs)) {
		if v, ok := gn.xattrs[k]; !ok {
			d = append(d, fmt.Sprintf("xattr %s: missing", k))
		} else {
			diff("xattr "+k, fmt.Sprintf("%q", wn.xattrs[k]), fmt.Sprintf("%q", v))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(gn.xattrs)) {
		if _, ok := wn.xattrs[k]; !ok {
			d = append(d, fmt.Sprintf("xattr %s: extra", k))
		}
	}
	return d
}

func scanTree(root string, ignore []string) (*tree, error) {
	t := &tree{root: root, nodes: map[string]*node{}, links: map[string][]string{}}
	inodes := map[[2]uint64][]string{}
	err := filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		n := &node{}
		if err := unix.Lstat(path, &n.st); err != nil {
			return &fs.PathError{Op: "lstat", Path: path, Err: err}
		}
		isDir := n.st.Mode&unix.S_IFMT == unix.S_IFDIR
		if slices.Contains(ignore, rel) {
			if isDir {
				return filepath.SkipDir
			}
			return nil
		}
		if n.st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if n.target, err = os.Readlink(path); err != nil {
				return err
			}
		}
		if n.xattrs, err = userXattrs(path); err != nil {
			return err
		}
		t.nodes[rel] = n
		if !isDir {
			k := [2]uint64{n.st.Dev, n.st.Ino}
			inodes[k] = append(inodes[k], rel)
		}
		return nil
	})
	for _, paths := range inodes {
		slices.Sort(paths)
		for _, p := range paths {
			t.links[p] = paths
		}
	}
	return t, err
}

// userXattrs returns the user.* extended attributes of path (not following
// symlinks).
func userXattrs(path string) (map[string]string, error) {
	buf := make([]byte, 4096)
	for {
		n, err := unix.Llistxattr(path, buf)
		if errors.Is(err, unix.ERANGE) {
			buf = make([]byte, 2*len(buf))
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, &fs.PathError{Op: "llistxattr", Path: path, Err: err}
		}
		buf = buf[:n]
		break
	}
	xs := map[string]string{}
	for _, k := range strings.Split(string(buf), "\x00") {
		if !strings.HasPrefix(k, "user.") {
			continue
		}
		v := make([]byte, 64<<10)
		n, err := unix.Lgetxattr(path, k, v)
		if err != nil {
			return nil, &fs.PathError{Op: "lgetxattr " + k, Path: path, Err: err}
		}
		xs[k] = string(v[:n])
	}
	return xs, nil
}

// fileSum returns the hex sha256 of a file's content, or the error text.
func fileSum(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err.Error()
	}
	return hex.EncodeToString(h.Sum(nil))
}

func mtime(st *unix.Stat_t) string {
	return time.Unix(st.Mtim.Sec, 0).UTC().Format(time.RFC3339)
}

func devString(rdev uint64) string {
	return fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev))
}

func typeName(t uint32) string {
	switch t {
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFCHR:
		return "char device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	}
	return fmt.Sprintf("type %#o", t)
}
