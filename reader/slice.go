package reader

import (
	"context"
	"io"
	"sort"
)

// ReadSlice returns up to size bytes of regular file n at off, like ReadAt
// into a new buffer. When they lie within one chunk, the result is a slice
// of the cached chunk itself, not a copy: callers must not modify it. It
// returns io.EOF with the bytes there are when the file ends first.
func (l *Layer) ReadSlice(ctx context.Context, n *Node, off int64, size int) ([]byte, error) {
	if n.Mode.IsRegular() && off >= 0 && off < n.Size && size > 0 {
		i := sort.Search(len(n.chunks), func(i int) bool { return n.chunks[i].off+n.chunks[i].size > off })
		end := min(off+int64(size), n.Size)
		if i < len(n.chunks) && end <= n.chunks[i].off+n.chunks[i].size {
			l.noteRead(n, off, int64(size))
			c := &n.chunks[i]
			data, err := l.chunk(ctx, n, i)
			if err != nil {
				return nil, err
			}
			out := data[off-c.off : end-c.off]
			if end < off+int64(size) {
				return out, io.EOF
			}
			return out, nil
		}
	}
	buf := make([]byte, size)
	got, err := l.ReadAt(ctx, n, buf, off)
	return buf[:got], err
}
