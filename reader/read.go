package reader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"time"

	"github.com/klauspost/compress/gzip"
)

// ErrCorrupt marks data that failed verification: the blob's bytes are not
// what the TOC promised. Trying again will not help.
var ErrCorrupt = errors.New("corrupt chunk")

// ReadAt reads a regular file's bytes at off into p, fetching, verifying and
// caching the chunks it needs. It returns io.EOF when p reaches past the end.
func (l *Layer) ReadAt(ctx context.Context, n *Node, p []byte, off int64) (int, error) {
	if !n.Mode.IsRegular() {
		return 0, fmt.Errorf("read %s %s: not a regular file", l.name, n.Path())
	}
	if off < 0 {
		return 0, fmt.Errorf("read %s %s: negative offset", l.name, n.Path())
	}
	if off >= n.Size {
		return 0, io.EOF
	}
	i := sort.Search(len(n.chunks), func(i int) bool { return n.chunks[i].off+n.chunks[i].size > off })
	done := 0
	for ; i < len(n.chunks) && done < len(p); i++ {
		c := &n.chunks[i]
		data, err := l.chunk(ctx, n, i)
		if err != nil {
			return done, err
		}
		done += copy(p[done:], data[off+int64(done)-c.off:])
	}
	if done < len(p) {
		return done, io.EOF
	}
	return done, nil
}

// readAhead bounds the compressed bytes one request fetches: on a miss, the
// chunk asked for and the file's following chunks up to this size come in
// one Range request, so a sequential reader does not pay a round trip per
// chunk.
const readAhead = 4 << 20

// fetchTimeout bounds one chunk fetch, retries included.
const fetchTimeout = 2 * time.Minute

func (l *Layer) key(c *chunk) string {
	return l.name + "@" + strconv.FormatInt(c.blobOff, 10) + "+" + strconv.FormatInt(c.inner, 10)
}

// chunk returns the decompressed, verified bytes of n.chunks[i].
func (l *Layer) chunk(ctx context.Context, n *Node, i int) ([]byte, error) {
	c := &n.chunks[i]
	key := l.key(c)
	if b, ok := l.cache.get(key); ok && int64(len(b)) == c.size {
		return b, nil
	}
	v, err, _ := l.flight.Do(key, func() (any, error) {
		// Other readers may wait on this fetch: one caller giving up (an
		// interrupted read) must not fail theirs.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		defer cancel()
		return l.fetchRun(fctx, n, i)
	})
	if err != nil {
		return nil, fmt.Errorf("read %s %s at %d: %w", l.name, n.Path(), c.off, err)
	}
	return v.([]byte), nil
}

// fetchRun fetches chunk i and, in the same request, the following chunks
// of the file that are contiguous in the blob, not cached and within
// readAhead. It caches every chunk that verifies and returns chunk i's bytes.
func (l *Layer) fetchRun(ctx context.Context, n *Node, i int) ([]byte, error) {
	first := &n.chunks[i]
	last := i
	for j := i + 1; j < len(n.chunks); j++ {
		c := &n.chunks[j]
		if c.blobOff != n.chunks[j-1].blobEnd || c.blobEnd-first.blobOff > readAhead {
			break
		}
		if _, ok := l.cache.get(l.key(c)); ok {
			break
		}
		last = j
	}
	comp := make([]byte, n.chunks[last].blobEnd-first.blobOff)
	if err := readFull(ctx, l.blob, comp, first.blobOff); err != nil {
		return nil, fmt.Errorf("fetch blob bytes %d-%d: %w", first.blobOff, first.blobOff+int64(len(comp))-1, err)
	}
	var want []byte
	for j := i; j <= last; j++ {
		c := &n.chunks[j]
		data, err := decode(c, comp[c.blobOff-first.blobOff:c.blobEnd-first.blobOff])
		if j == i {
			if err != nil {
				return nil, err
			}
			want = data
		} else if err != nil {
			// Read ahead only: the read of that chunk will report it.
			break
		}
		l.cache.set(l.key(c), data)
	}
	return want, nil
}

// decode decompresses chunk c from its compressed bytes and verifies it.
func decode(c *chunk, comp []byte) ([]byte, error) {
	if c.zstd {
		return decodeZstd(c, comp)
	}
	// Deflate cannot expand data more than 1032 times: a TOC declaring more
	// is lying, and believing it would allocate for nothing.
	if c.inner+c.size > int64(len(comp))*1032+1024 {
		return nil, fmt.Errorf("%w: chunk at blob offset %d declares %d bytes, more than %d compressed bytes can hold", ErrCorrupt, c.blobOff, c.inner+c.size, len(comp))
	}
	zr, err := gzip.NewReader(bytes.NewReader(comp))
	if err != nil {
		return nil, fmt.Errorf("%w: blob bytes %d-%d are not gzip: %v", ErrCorrupt, c.blobOff, c.blobEnd-1, err)
	}
	defer zr.Close()
	if _, err := io.CopyN(io.Discard, zr, c.inner); err != nil {
		return nil, fmt.Errorf("%w: gzip member at %d ends before inner offset %d: %v", ErrCorrupt, c.blobOff, c.inner, err)
	}
	data := make([]byte, c.size)
	if _, err := io.ReadFull(zr, data); err != nil {
		return nil, fmt.Errorf("%w: gzip member at %d holds less than the %d bytes the TOC declares: %v", ErrCorrupt, c.blobOff, c.size, err)
	}
	if c.digest != "" {
		v := c.digest.Verifier()
		v.Write(data)
		if !v.Verified() {
			return nil, fmt.Errorf("%w: chunk at blob offset %d does not match its digest %s", ErrCorrupt, c.blobOff, c.digest)
		}
	}
	return data, nil
}
