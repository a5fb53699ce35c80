package reader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"

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
		data, err := l.chunk(ctx, n, c)
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

// chunk returns the decompressed, verified bytes of c.
func (l *Layer) chunk(ctx context.Context, n *Node, c *chunk) ([]byte, error) {
	key := l.name + "@" + strconv.FormatInt(c.blobOff, 10) + "+" + strconv.FormatInt(c.inner, 10)
	if b, ok := l.cache.get(key); ok && int64(len(b)) == c.size {
		return b, nil
	}
	v, err, _ := l.flight.Do(key, func() (any, error) {
		b, err := l.fetchChunk(ctx, c)
		if err != nil {
			return nil, err
		}
		l.cache.set(key, b)
		return b, nil
	})
	if err != nil {
		return nil, fmt.Errorf("read %s %s at %d: %w", l.name, n.Path(), c.off, err)
	}
	return v.([]byte), nil
}

func (l *Layer) fetchChunk(ctx context.Context, c *chunk) ([]byte, error) {
	comp := make([]byte, c.blobEnd-c.blobOff)
	if err := readFull(ctx, l.blob, comp, c.blobOff); err != nil {
		return nil, fmt.Errorf("fetch blob bytes %d-%d: %w", c.blobOff, c.blobEnd-1, err)
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
