// Package layertest holds test helpers that build layers and images and check
// trees; it is used only by tests.
package layertest

import (
	"archive/tar"
	"bytes"
	"fmt"
	"path"
	"strings"
	"time"
)

// DefaultMTime is the modification time given to every entry unless MTime
// overrides it. It has whole seconds because the eStargz TOC keeps seconds only.
var DefaultMTime = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// Entry is one tar entry: a header and, for regular files, a body.
// Header.Size is filled in by Tar.
type Entry struct {
	Header tar.Header
	Body   []byte
}

// Opt adjusts an Entry.
type Opt func(*Entry)

// xattrPrefix is the PAX record prefix that carries extended attributes.
const xattrPrefix = "SCHILY.xattr."

func newEntry(typ byte, name string, mode int64, opts []Opt) Entry {
	e := Entry{Header: tar.Header{
		Typeflag: typ,
		Name:     name,
		Mode:     mode,
		ModTime:  DefaultMTime,
	}}
	for _, o := range opts {
		o(&e)
	}
	return e
}

// Dir returns a directory entry (mode 0755). The name gets a trailing slash,
// as docker writes it.
func Dir(name string, opts ...Opt) Entry {
	return newEntry(tar.TypeDir, strings.TrimSuffix(name, "/")+"/", 0o755, opts)
}

// File returns a regular file entry (mode 0644).
func File(name string, body []byte, opts ...Opt) Entry {
	e := newEntry(tar.TypeReg, name, 0o644, opts)
	e.Body = body
	return e
}

// FileString is File with a string body.
func FileString(name, s string, opts ...Opt) Entry {
	return File(name, []byte(s), opts...)
}

// Symlink returns a symbolic link entry (mode 0777).
func Symlink(name, target string, opts ...Opt) Entry {
	e := newEntry(tar.TypeSymlink, name, 0o777, opts)
	e.Header.Linkname = target
	return e
}

// Hardlink returns a hard link entry; target is the root-relative path of a
// file earlier in the same layer.
func Hardlink(name, target string, opts ...Opt) Entry {
	e := newEntry(tar.TypeLink, name, 0o644, opts)
	e.Header.Linkname = target
	return e
}

// Char returns a character device entry (mode 0644).
func Char(name string, major, minor int64, opts ...Opt) Entry {
	e := newEntry(tar.TypeChar, name, 0o644, opts)
	e.Header.Devmajor, e.Header.Devminor = major, minor
	return e
}

// Block returns a block device entry (mode 0644).
func Block(name string, major, minor int64, opts ...Opt) Entry {
	e := newEntry(tar.TypeBlock, name, 0o644, opts)
	e.Header.Devmajor, e.Header.Devminor = major, minor
	return e
}

// Fifo returns a named pipe entry (mode 0644).
func Fifo(name string, opts ...Opt) Entry {
	return newEntry(tar.TypeFifo, name, 0o644, opts)
}

// Whiteout returns the OCI whiteout for name ("dir/.wh.base"): an empty
// regular file with mode 0, as docker writes it.
func Whiteout(name string) Entry {
	dir, base := path.Split(strings.TrimSuffix(name, "/"))
	return File(dir+".wh."+base, nil, Mode(0))
}

// Opaque returns the opaque-directory marker "dir/.wh..wh..opq".
func Opaque(dir string) Entry {
	return File(strings.TrimSuffix(dir, "/")+"/.wh..wh..opq", nil, Mode(0))
}

// Mode sets the raw permission bits, including 04000 setuid, 02000 setgid
// and 01000 sticky.
func Mode(m int64) Opt { return func(e *Entry) { e.Header.Mode = m } }

// Owner sets the numeric owner.
func Owner(uid, gid int) Opt {
	return func(e *Entry) { e.Header.Uid, e.Header.Gid = uid, gid }
}

// MTime sets the modification time, truncated to whole seconds.
func MTime(t time.Time) Opt {
	return func(e *Entry) { e.Header.ModTime = t.Truncate(time.Second) }
}

// Xattr adds an extended attribute, written as a PAX "SCHILY.xattr." record.
// The value must not be empty (an empty PAX record means "unset").
func Xattr(key, value string) Opt {
	return func(e *Entry) {
		if e.Header.PAXRecords == nil {
			e.Header.PAXRecords = map[string]string{}
		}
		e.Header.PAXRecords[xattrPrefix+key] = value
	}
}

// Tar writes the entries, in order, as an uncompressed tar archive. The
// output is deterministic; archive/tar switches to PAX where USTAR cannot
// hold a header (long names, xattrs, big ids). It panics on an invalid entry.
func Tar(entries ...Entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.Header
		h.Size = 0
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.Body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			panic(fmt.Sprintf("layertest: tar header %q: %v", h.Name, err))
		}
		if _, err := tw.Write(e.Body); err != nil {
			panic(fmt.Sprintf("layertest: tar body %q: %v", h.Name, err))
		}
	}
	if err := tw.Close(); err != nil {
		panic(fmt.Sprintf("layertest: tar close: %v", err))
	}
	return buf.Bytes()
}
