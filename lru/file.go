package lru

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"runtime"
	"sync/atomic"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// fileXattr labels a file entry with its length and the CRC-32C of each
// of its blocks, so that OpenFile can check the blocks in parallel:
// length (8 bytes), block size (4 bytes), then one CRC per block, all
// little endian.
const fileXattr = "user.stargz-mount.crc32c"

// Blocks are at least minFileBlock bytes, and as many bigger as keep a
// label within maxFileBlocks CRCs (2 KiB).
const (
	minFileBlock  = 8 << 20
	maxFileBlocks = 512
)

// verifiedXattr stamps a file entry as checked during this boot, while it
// had its current modification time: the boot ID (36 bytes) and the
// mtime in nanoseconds (8 bytes, little endian). OpenFile skips reading a
// stamped entry whole. Checking is for what corrupts a file unseen: a
// crash before the data reached the disk (a new boot) or a write by
// something else (a new mtime). Within one boot, after a check, the data
// is what the page cache and the disk hold, as for any local file.
const verifiedXattr = "user.stargz-mount.verified"

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil || len(bytes.TrimSpace(b)) != 36 {
		return ""
	}
	return string(bytes.TrimSpace(b))
}

// stamp marks f as checked, with its modification time now.
func (s *Store) stamp(f *os.File) {
	if s.boot == "" {
		return
	}
	fi, err := f.Stat()
	if err != nil {
		return
	}
	v := binary.LittleEndian.AppendUint64([]byte(s.boot), uint64(fi.ModTime().UnixNano()))
	if err := unix.Fsetxattr(int(f.Fd()), verifiedXattr, v, 0); err != nil {
		s.logger.Debug("stamping a checked cache file", "file", f.Name(), "err", err)
	}
}

// stamped reports whether f carries a stamp of this boot for its
// modification time.
func (s *Store) stamped(f *os.File, fi os.FileInfo) bool {
	if s.boot == "" {
		return false
	}
	var v [36 + 8]byte
	n, err := unix.Fgetxattr(int(f.Fd()), verifiedXattr, v[:])
	return err == nil && n == len(v) && string(v[:36]) == s.boot &&
		int64(binary.LittleEndian.Uint64(v[36:])) == fi.ModTime().UnixNano()
}

func fileBlock(size int64) int64 {
	b := int64(minFileBlock)
	for (size+b-1)/b > maxFileBlocks {
		b *= 2
	}
	return b
}

// PutFile stores a file entry of size bytes, written by fill, under key
// unless an entry is there already, evicting the least recently used
// entries to stay within the bound. fill must write exactly size bytes.
func (s *Store) PutFile(key string, size int64, fill func(io.Writer) error) error {
	return s.put(key, size, func(f *os.File, p string) error { return s.writeFile(f, p, size, fill) })
}

// writeFile fills the reserved temp file f, labels it with its checksums
// and links it into place at p.
func (s *Store) writeFile(f *os.File, p string, size int64, fill func(io.Writer) error) error {
	bw := &blockWriter{w: f, block: fileBlock(size), h: crc32.New(castagnoli)}
	err := fill(bw)
	if err == nil && bw.n != size {
		err = fmt.Errorf("wrote %d bytes, want %d", bw.n, size)
	}
	if err == nil {
		label := binary.LittleEndian.AppendUint64(nil, uint64(size))
		label = binary.LittleEndian.AppendUint32(label, uint32(bw.block))
		for _, c := range bw.sums() {
			label = binary.LittleEndian.AppendUint32(label, c)
		}
		if xerr := unix.Fsetxattr(int(f.Fd()), fileXattr, label, 0); xerr != nil {
			err = fmt.Errorf("label with checksums (does the cache dir's file system take user xattrs?): %w", xerr)
		} else {
			s.stamp(f) // written from checked data
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

// blockWriter writes to w and sums each block of what it writes.
type blockWriter struct {
	w     io.Writer
	block int64
	n     int64 // bytes written
	h     hash.Hash32
	done  []uint32 // CRCs of the full blocks so far
}

func (b *blockWriter) Write(p []byte) (int, error) {
	n, err := b.w.Write(p)
	for q := p[:n]; len(q) > 0; {
		k := min(int64(len(q)), b.block-b.n%b.block)
		b.h.Write(q[:k])
		b.n += k
		q = q[k:]
		if b.n%b.block == 0 {
			b.done = append(b.done, b.h.Sum32())
			b.h.Reset()
		}
	}
	return n, err
}

// sums returns the CRC of every block, the last one partial.
func (b *blockWriter) sums() []uint32 {
	if b.n%b.block != 0 {
		return append(b.done, b.h.Sum32())
	}
	return b.done
}

// OpenFile opens the file entry under key, read-only, after checking its
// length and, unless it was checked during this boot and not modified
// since (verifiedXattr), the CRC-32C of each block, which reads it whole,
// blocks in parallel. A missing, unreadable or corrupt entry is a miss; a
// corrupt one is removed.
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
	fi, err := f.Stat()
	if err != nil {
		return nil, false
	}
	label := make([]byte, 12+4*maxFileBlocks)
	n, err := unix.Fgetxattr(int(f.Fd()), fileXattr, label)
	if err != nil || n < 12 {
		s.drop(p, key, "no checksum label")
		return nil, false
	}
	size := int64(binary.LittleEndian.Uint64(label[0:8]))
	block := int64(binary.LittleEndian.Uint32(label[8:12]))
	var sums []uint32
	for i := 12; i+4 <= n; i += 4 {
		sums = append(sums, binary.LittleEndian.Uint32(label[i:]))
	}
	if size < 0 || block <= 0 || int64(len(sums)) != (size+block-1)/block {
		s.drop(p, key, "bad checksum label")
		return nil, false
	}
	if fi.Size() != size {
		// Counted at the length it was written with.
		s.logger.Warn("dropping corrupt cache entry", "key", key, "why", "wrong length")
		s.removeCounted(p, diskCost(size))
		return nil, false
	}
	checked := s.stamped(f, fi)
	if !checked {
		good, err := checkBlocks(f, size, block, sums)
		if err != nil {
			s.logger.Debug("cache read failed", "key", key, "err", err)
			return nil, false
		}
		if !good {
			s.drop(p, key, "checksum mismatch")
			return nil, false
		}
	}
	if touch(p, fi) {
		checked = false // its stamp names the old mtime
	}
	if !checked {
		s.stamp(f)
	}
	ok = true
	return f, true
}

// checkBlocks reads f's blocks, several at once, and reports whether each
// matches its CRC.
func checkBlocks(f *os.File, size, block int64, sums []uint32) (bool, error) {
	const piece = 1 << 20 // read size
	var (
		next atomic.Int64 // the next block to check
		bad  atomic.Bool
		g    errgroup.Group
	)
	for range min(runtime.GOMAXPROCS(0), 4, len(sums)) {
		g.Go(func() error {
			buf := make([]byte, piece)
			for {
				i := next.Add(1) - 1
				if i >= int64(len(sums)) || bad.Load() {
					return nil
				}
				var sum uint32
				end := min(size, (i+1)*block)
				for off := i * block; off < end; {
					n, err := f.ReadAt(buf[:min(piece, end-off)], off)
					if n < int(min(piece, end-off)) {
						if err == nil || err == io.EOF {
							err = io.ErrUnexpectedEOF
						}
						return err
					}
					sum = crc32.Update(sum, castagnoli, buf[:n])
					off += int64(n)
				}
				if sum != sums[i] {
					bad.Store(true)
				}
			}
		})
	}
	if err := g.Wait(); err != nil {
		return false, err
	}
	return !bad.Load(), nil
}
