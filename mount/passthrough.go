package mount

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"bazil.org/fuse"
	"bazil.org/fuse/fs"

	"github.com/stargz-mount/stargz-mount/reader"
)

// FUSE passthrough. A file read whole through the daemon (all its chunks
// cached) is saved in the disk cache as one plain file (reader.SaveFile);
// later opens hand that file to the kernel (fuse.OpenPassthrough), which
// then reads it like a local file, without the daemon: warm reads run at
// the speed of the disk cache's file system instead of FUSE round trips.
// The lru store checks the copy (a CRC-32C per block) the first time it is
// opened after a boot or after it changed (lru.Store.OpenFile).
//
// The kernel holds an inode in one mode at a time: while any open of it
// reads through the daemon (keeping the page cache), a passthrough open
// fails, and the other way round. So a node is opened for passthrough
// only while it has no daemon-mode opens, and stays so while it has
// passthrough opens, all sharing one backing file.

// passthroughMin is the smallest file served by passthrough and saved
// whole: below it, the page cache serves re-reads and a saved copy would
// cost more than it spares.
const passthroughMin = 1 << 20

// saveQueue bounds the files waiting to be saved; more are dropped.
const saveQueue = 64

// saveGrace is how long a save in progress may go on once the file system
// is no longer served; then it is abandoned.
const saveGrace = 5 * time.Second

type passthrough struct {
	conn   *fuse.Conn
	layer  *reader.Layer
	logger *slog.Logger

	disabled atomic.Bool // registering a backing file failed: the kernel or the cache dir cannot
	closing  atomic.Bool // the file system is no longer served: save no more
	ctx      context.Context
	cancel   context.CancelFunc // abandons the save in progress

	mu     sync.Mutex // guards files, closed and sends on saves
	files  map[*reader.Node]*ptFile
	closed bool

	saves chan *reader.Node
	saved sync.WaitGroup // the saver
}

// ptFile is one file's open state. Its lock is never held with
// passthrough.mu.
type ptFile struct {
	mu      sync.Mutex // guards the fields below
	daemon  int        // opens reading through the daemon
	pass    int        // opens reading the backing file
	backing int32      // backing file ID, registered while pass > 0
	queued  bool       // queued for saving, or saved
}

func newPassthrough(c *fuse.Conn, l *reader.Layer, logger *slog.Logger) *passthrough {
	p := &passthrough{conn: c, layer: l, logger: logger, files: map[*reader.Node]*ptFile{},
		saves: make(chan *reader.Node, saveQueue)}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.saved.Add(1)
	go p.saver()
	return p
}

// wants reports whether n's opens go through passthrough's bookkeeping.
func (p *passthrough) wants(n *reader.Node) bool {
	return n.Mode.IsRegular() && n.Size >= passthroughMin
}

func (p *passthrough) file(n *reader.Node) *ptFile {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.files[n]
	if f == nil {
		f = &ptFile{}
		p.files[n] = f
	}
	return f
}

// open answers an open of n: through the backing file when it can, else
// through the daemon with the page cache kept.
func (p *passthrough) open(n node, resp *fuse.OpenResponse) fs.Handle {
	f := p.file(n.n)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pass == 0 && f.daemon == 0 && !p.disabled.Load() {
		if id, ok := p.register(n.n); ok {
			f.backing = id
		}
	}
	if f.pass > 0 || (f.daemon == 0 && f.backing > 0) {
		f.pass++
		p.layer.CountSavedOpen()
		resp.Flags |= fuse.OpenPassthrough
		resp.BackingID = f.backing
		return &ptHandle{node: n, p: p, f: f, pass: true}
	}
	f.daemon++
	resp.Flags |= fuse.OpenKeepCache
	return &ptHandle{node: n, p: p, f: f}
}

// register opens n's saved copy, checked, and registers it with the
// kernel. Backing IDs are positive.
func (p *passthrough) register(n *reader.Node) (int32, bool) {
	file, ok := p.layer.SavedFile(n)
	if !ok {
		return 0, false
	}
	defer file.Close() // the kernel keeps its own reference
	id, err := p.conn.OpenBacking(file)
	if err != nil || id <= 0 {
		if p.disabled.CompareAndSwap(false, true) {
			p.logger.Warn("FUSE passthrough unavailable, reading through the daemon (is the cache dir on a stacked file system such as overlayfs?)",
				"layer", p.layer.Name(), "err", err)
		}
		return 0, false
	}
	return id, true
}

// release ends an open. The last passthrough open drops the backing ID;
// the last daemon-mode open of a file whose chunks are all cached queues
// it for saving.
func (p *passthrough) release(h *ptHandle) {
	f := h.f
	f.mu.Lock()
	if h.pass {
		f.pass--
		if f.pass == 0 {
			if err := p.conn.CloseBacking(f.backing); err != nil {
				p.logger.Debug("dropping a backing file", "layer", p.layer.Name(), "err", err)
			}
			f.backing = 0
		}
		f.mu.Unlock()
		return
	}
	f.daemon--
	save := f.daemon == 0 && !f.queued && !p.disabled.Load()
	if save {
		f.queued = true
	}
	f.mu.Unlock()
	if save && !(p.layer.Cached(h.n) && p.queue(h.n)) {
		f.mu.Lock()
		f.queued = false
		f.mu.Unlock()
	}
}

// queue hands n to the saver, unless closed or busy.
func (p *passthrough) queue(n *reader.Node) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	select {
	case p.saves <- n:
		return true
	default:
		return false
	}
}

// saver saves queued files, one at a time, until close.
func (p *passthrough) saver() {
	defer p.saved.Done()
	for n := range p.saves {
		if p.closing.Load() {
			continue // drain what is left unsaved
		}
		err := p.layer.SaveFile(p.ctx, n)
		switch {
		case err == nil:
			p.logger.Debug("saved a file for passthrough", "layer", p.layer.Name(), "path", n.Path())
		case errors.Is(err, reader.ErrTooLarge):
			p.logger.Debug("not saving a file for passthrough", "layer", p.layer.Name(), "path", n.Path(), "err", err)
		case errors.Is(err, context.Canceled):
			p.logger.Info("abandoned saving a file for passthrough at unmount", "layer", p.layer.Name(), "path", n.Path())
		case errors.Is(err, reader.ErrNotCached):
			// Evicted meanwhile: the next read of it whole queues
			// it again.
			f := p.file(n)
			f.mu.Lock()
			f.queued = false
			f.mu.Unlock()
		default:
			p.logger.Warn("saving a file for passthrough", "layer", p.layer.Name(), "path", n.Path(), "err", err)
		}
	}
}

// close gives the saver saveGrace to finish the file it is saving, drops
// the rest and waits for it.
func (p *passthrough) close() {
	p.closing.Store(true)
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.saves)
	}
	p.mu.Unlock()
	t := time.AfterFunc(saveGrace, p.cancel)
	p.saved.Wait()
	t.Stop()
	p.cancel()
}

// ptHandle is an open regular file whose opens passthrough tracks.
type ptHandle struct {
	node
	p    *passthrough
	f    *ptFile
	pass bool
}

var (
	_ fs.HandleReader   = (*ptHandle)(nil)
	_ fs.HandleReleaser = (*ptHandle)(nil)
)

// Release implements fs.HandleReleaser.
func (h *ptHandle) Release(ctx context.Context, req *fuse.ReleaseRequest) error {
	h.p.release(h)
	return nil
}
