package unpack

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBusy is returned by Remove for a layer a live mount holds.
var ErrBusy = errors.New("in use by a live mount")

// Hold marks the layer with blob digest dgst as used by a live mount until
// release is called (a shared flock on its .hold file, so it ends with the
// process), and records the use for least-recently-used pruning. Take it
// before Layer so that no prune removes the layer in between.
func (s *Store) Hold(dgst string) (release func(), err error) {
	final, err := s.Path(dgst)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		return nil, fmt.Errorf("layer store: %w", err)
	}
	f, err := os.OpenFile(final+".hold", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("layer store: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("layer store: %w", err)
	}
	now := time.Now()
	os.Chtimes(f.Name(), now, now)
	return func() { f.Close() }, nil
}

// Info describes one unpacked layer.
type Info struct {
	Digest   string    `json:"digest"`
	Bytes    int64     `json:"bytes"` // disk blocks used
	LastUsed time.Time `json:"lastUsed"`
	InUse    bool      `json:"inUse"`
}

// Layers lists the unpacked layers, least recently used first.
func (s *Store) Layers() ([]Info, error) { return s.list(true) }

// list lists the unpacked layers, least recently used first; InUse is
// found out only with probe (a lock taken and released per layer).
func (s *Store) list(probe bool) ([]Info, error) {
	dir := filepath.Join(s.dir, "sha256")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, e := range ents {
		if !e.IsDir() || strings.Contains(e.Name(), ".") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		in := Info{Digest: "sha256:" + e.Name(), Bytes: size(p)}
		if fi, err := os.Stat(p + ".hold"); err == nil {
			in.LastUsed = fi.ModTime()
		} else if fi, err := os.Stat(p); err == nil {
			in.LastUsed = fi.ModTime()
		}
		if probe {
			if f, ok := tryLock(p + ".hold"); ok {
				f.Close()
			} else {
				in.InUse = true
			}
		}
		out = append(out, in)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LastUsed.Before(out[j].LastUsed) })
	return out, nil
}

// Usage is the disk space all unpacked layers use. It takes no locks, so
// it neither waits for nor disturbs Hold, Remove and Prune.
func (s *Store) Usage() (int64, error) {
	ls, err := s.list(false)
	var n int64
	for _, l := range ls {
		n += l.Bytes
	}
	return n, err
}

// Remove deletes the unpacked layer dgst unless a live mount holds it
// (ErrBusy), and returns the bytes freed.
func (s *Store) Remove(dgst string) (int64, error) {
	final, err := s.Path(dgst)
	if err != nil {
		return 0, err
	}
	f, ok := tryLock(final + ".hold")
	if !ok {
		return 0, fmt.Errorf("layer %s: %w", dgst, ErrBusy)
	}
	defer f.Close()
	n := size(final)
	os.Remove(final + ".size")
	// Out of the way first, so no mount finds a half-removed layer.
	tmp := final + ".tmp-rm"
	if err := os.Rename(final, tmp); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	return n, os.RemoveAll(tmp)
}

// Prune removes unheld layers, least recently used first, until they use
// at most max bytes, and returns the bytes freed.
func (s *Store) Prune(max int64) (int64, error) {
	ls, err := s.Layers()
	if err != nil {
		return 0, err
	}
	var used, freed int64
	for _, l := range ls {
		used += l.Bytes
	}
	for _, l := range ls {
		if used <= max {
			break
		}
		if l.InUse {
			continue
		}
		n, err := s.Remove(l.Digest)
		if errors.Is(err, ErrBusy) {
			continue
		}
		if err != nil {
			return freed, err
		}
		used -= n
		freed += n
	}
	return freed, nil
}

// tryLock takes an exclusive flock on path without waiting; it fails if
// anyone holds the file.
func tryLock(path string) (*os.File, bool) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, false
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, false
	}
	return f, true
}

// du sums the disk blocks of the tree at p, not following symlinks.
func du(p string) int64 {
	var n int64
	seen := map[[2]uint64]bool{}
	filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st unix.Stat_t
		if unix.Lstat(path, &st) != nil {
			return nil
		}
		if st.Nlink > 1 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			k := [2]uint64{st.Dev, st.Ino}
			if seen[k] {
				return nil
			}
			seen[k] = true
		}
		n += st.Blocks * 512
		return nil
	})
	return n
}
