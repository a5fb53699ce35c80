package reader

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
)

// Saved files. A regular file whose chunks are all cached can be saved
// whole in the Store as one plain file (a file entry of the lru store),
// which a caller may hand to the kernel to read directly (FUSE
// passthrough). Saving reads only what is cached; it never fetches.

// ErrNotCached is returned by SaveFile when a chunk of the file is neither
// in memory nor in the Store.
var ErrNotCached = errors.New("not all of the file is cached")

// ErrNoFileStore is returned by SaveFile when the cache has no Store that
// keeps files.
var ErrNoFileStore = errors.New("no store for whole files")

// FileStore is a Store that also keeps whole files, such as lru.Store.
type FileStore interface {
	Store
	// PutFile stores size bytes, written by fill, under key.
	PutFile(key string, size int64, fill func(io.Writer) error) error
	// OpenFile opens what PutFile stored under key, checked, or returns
	// false.
	OpenFile(key string) (*os.File, bool)
	// Max is the store's bound in bytes.
	Max() int64
}

// ErrTooLarge is returned by SaveFile for a file larger than a
// maxSavedShare of the Store's bound: a saved copy is kept beside the
// file's chunks, and one that large would evict too much of the cache.
var ErrTooLarge = errors.New("file too large to save beside its chunks")

const maxSavedShare = 8

func (l *Layer) fileKey(n *Node) string {
	return l.name + "/f" + strconv.FormatInt(n.chunks[0].blobOff, 10)
}

func (l *Layer) fileStore() FileStore {
	fs, _ := l.cache.store.(FileStore)
	return fs
}

// Cached reports whether every chunk of the regular file n is cached in
// memory or in the Store, without reading any from the Store.
func (l *Layer) Cached(n *Node) bool {
	if !n.Mode.IsRegular() {
		return false
	}
	for i := range n.chunks {
		if !l.cache.has(l.key(&n.chunks[i])) {
			return false
		}
	}
	return true
}

// SaveFile stores the regular file n whole in the Store, from its cached
// chunks, unless it is stored already. It returns ErrNotCached, fetching
// nothing, when a chunk is not cached, and ErrNoFileStore without a
// FileStore. Cancelling ctx abandons the copy.
func (l *Layer) SaveFile(ctx context.Context, n *Node) error {
	fs := l.fileStore()
	if fs == nil {
		return ErrNoFileStore
	}
	if !n.Mode.IsRegular() || len(n.chunks) == 0 {
		return fmt.Errorf("save %s %s: not a regular file with data", l.name, n.Path())
	}
	if n.Size > fs.Max()/maxSavedShare {
		return fmt.Errorf("save %s %s: %w (%d bytes, disk cache bound %d)", l.name, n.Path(), ErrTooLarge, n.Size, fs.Max())
	}
	if !l.Cached(n) {
		return fmt.Errorf("save %s %s: %w", l.name, n.Path(), ErrNotCached)
	}
	err := fs.PutFile(l.fileKey(n), n.Size, func(w io.Writer) error {
		for i := range n.chunks {
			if err := ctx.Err(); err != nil {
				return err
			}
			c := &n.chunks[i]
			b, ok := l.cache.peek(l.key(c))
			if !ok || int64(len(b)) != c.size {
				return ErrNotCached // evicted meanwhile
			}
			if _, err := w.Write(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("save %s %s: %w", l.name, n.Path(), err)
	}
	l.acct.filesSaved.Add(1)
	return nil
}

// SavedFile opens the copy of the regular file n that SaveFile stored,
// after the Store has checked it, or returns false. Reads of the returned
// file bypass the layer: opening it counts as the file's first access
// for the access record; count the opens it serves with CountSavedOpen.
func (l *Layer) SavedFile(n *Node) (*os.File, bool) {
	fs := l.fileStore()
	if fs == nil || !n.Mode.IsRegular() || len(n.chunks) == 0 {
		return nil, false
	}
	f, ok := fs.OpenFile(l.fileKey(n))
	if !ok {
		return nil, false
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != n.Size {
		f.Close()
		return nil, false
	}
	l.note(n)
	return f, true
}

// CountSavedOpen counts an open served from a saved copy (Stats.SavedOpens).
func (l *Layer) CountSavedOpen() { l.acct.savedOpens.Add(1) }
