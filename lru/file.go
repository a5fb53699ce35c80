package lru

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// fileXattr holds a file entry's CRC-32C and length (12 bytes, little
// endian).
const fileXattr = "user.stargz-mount.crc32c"

// PutFile stores a file entry of size bytes, written by fill, under key
// unless an entry is there already, evicting the least recently used
// entries to stay within the bound. fill must write exactly size bytes.
func (s *Store) PutFile(key string, size int64, fill func(io.Writer) error) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(p); err == nil {
		return nil
	}
	c := diskCost(size)
	if c > s.max {
		return fmt.Errorf("put file %s (%d bytes): %w", key, size, ErrTooLarge)
	}
	f, err := s.reserve(c, size)
	if err != nil {
		return fmt.Errorf("put file %s: %w", key, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := s.writeFile(f, p, size, fill); err != nil {
		s.release(c)
		if errors.Is(err, fs.ErrExist) {
			return nil // another writer won
		}
		return fmt.Errorf("put file %s: %w", key, err)
	}
	return nil
}

// writeFile fills the reserved temp file f, labels it with its checksum
// and links it into place at p.
func (s *Store) writeFile(f *os.File, p string, size int64, fill func(io.Writer) error) error {
	h := crc32.New(castagnoli)
	cw := &countingWriter{w: io.MultiWriter(f, h)}
	err := fill(cw)
	if err == nil && cw.n != size {
		err = fmt.Errorf("wrote %d bytes, want %d", cw.n, size)
	}
	if err == nil {
		var x [12]byte
		binary.LittleEndian.PutUint32(x[0:4], h.Sum32())
		binary.LittleEndian.PutUint64(x[4:12], uint64(size))
		if xerr := unix.Fsetxattr(int(f.Fd()), fileXattr, x[:], 0); xerr != nil {
			err = fmt.Errorf("label with checksum (does the cache dir's file system take user xattrs?): %w", xerr)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return s.link(f.Name(), p)
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// OpenFile opens the file entry under key, read-only, after checking its
// length and CRC-32C, which reads it whole (and so brings it into the page
// cache). A missing, unreadable or corrupt entry is a miss; a corrupt one
// is removed.
func (s *Store) OpenFile(key string) (*os.File, bool) {
	p, err := s.path(key)
	if err != nil {
		return nil, false
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, false
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	var x [12]byte
	fi, err := f.Stat()
	if err != nil {
		return nil, false
	}
	if n, err := unix.Fgetxattr(int(f.Fd()), fileXattr, x[:]); err != nil || n != len(x) {
		s.drop(p, key, "no checksum label")
		return nil, false
	}
	want, size := binary.LittleEndian.Uint32(x[0:4]), int64(binary.LittleEndian.Uint64(x[4:12]))
	if fi.Size() != size {
		// Counted at the length it was written with.
		s.logger.Warn("dropping corrupt cache entry", "key", key, "why", "wrong length")
		s.removeCounted(p, diskCost(size))
		return nil, false
	}
	sum, err := crcOf(f, size)
	if err != nil {
		s.logger.Debug("cache read failed", "key", key, "err", err)
		return nil, false
	}
	if sum != want {
		s.drop(p, key, "checksum mismatch")
		return nil, false
	}
	if time.Since(fi.ModTime()) > touchAfter {
		now := time.Now()
		os.Chtimes(p, now, now)
	}
	ok = true
	return f, true
}

// crcOf reads f's first size bytes and returns their CRC-32C. Reading and
// summing overlap: one goroutine reads the next block while this one sums.
func crcOf(f *os.File, size int64) (uint32, error) {
	const block = 4 << 20
	type part struct {
		b   []byte
		err error
	}
	parts := make(chan part, 2)
	free := make(chan []byte, 3)
	for range 3 {
		free <- make([]byte, block)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		defer close(parts)
		for off := int64(0); off < size; {
			var b []byte
			select {
			case b = <-free:
			case <-stop:
				return
			}
			n, err := f.ReadAt(b[:min(block, size-off)], off)
			if err == io.EOF && int64(n) == min(block, size-off) {
				err = nil
			}
			parts <- part{b[:n], err}
			if err != nil {
				return
			}
			off += int64(n)
		}
	}()
	var sum uint32
	for p := range parts {
		if p.err != nil {
			return 0, p.err
		}
		sum = crc32.Update(sum, castagnoli, p.b)
		free <- p.b[:cap(p.b)]
	}
	return sum, nil
}
