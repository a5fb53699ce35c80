package mount

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"bazil.org/fuse"
	"bazil.org/fuse/fs"
	"golang.org/x/sys/unix"

	"github.com/stargz-mount/stargz-mount/reader"
)

// Options configures Mount.
type Options struct {
	// StateDir is where the per-mount directory (layer mount points,
	// writable upper and work dirs, state file) is made. Required.
	StateDir string
	// Writable adds an upper and a work directory inside the per-mount
	// directory, discarded at unmount.
	Writable bool
	// Upper and Work, both set, give a writable overlay whose changes are
	// kept in directories of the caller's choosing.
	Upper, Work string
	// Ref names the image in the state file, for humans.
	Ref string
	// Logger receives the layers' read failures. Default slog.Default().
	Logger *slog.Logger
	// SharedDir, if set, is where FUSE layers with a share key
	// (Lower.Share) are mounted for every process to use: a layer that
	// another process serves already is used from its mount, and one this
	// process serves outlives its overlay until no other process uses it
	// (see shared.go). Empty: every layer is mounted privately.
	SharedDir string
	// Passthrough lets the kernel read files saved whole in the disk
	// cache directly (FUSE passthrough, Linux 6.9+, root only; see
	// passthrough.go). It makes each layer mount a stacked file system:
	// an overlay on the rootfs can then not be stacked once more.
	Passthrough bool
}

// Mounted is a mounted stack: one FUSE mount per layer and an overlay.
type Mounted struct {
	Target      string
	dir         string // the per-mount state directory
	logger      *slog.Logger
	passthrough bool // Options.Passthrough

	mu       sync.Mutex // guards layers, shared, borrowed, overlay, closed, overlayProc and overlayExited
	layers   []*layerMount
	shared   []*sharedLayer
	borrowed map[*reader.Layer]int // layers another process serves, to its pid
	overlay  bool
	closed   bool
	// overlayProc is fuse-overlayfs when rootless; overlayExited receives
	// its exit.
	overlayProc   *exec.Cmd
	overlayExited chan error
}

type layerMount struct {
	dir    string
	conn   *fuse.Conn
	served chan error // receives fs.Serve's result once it returns
}

// State is what a mount records on disk so that `umount` can tear it down
// even after the server was killed.
type State struct {
	PID    int      `json:"pid"`
	Ref    string   `json:"ref"`
	Target string   `json:"target"`
	Layers []string `json:"layers"` // private layer mount points, bottom first
	// Shared are the directories of the shared layers the mount uses
	// (see shared.go).
	Shared []string `json:"shared,omitempty"`
}

const stateFile = "state.json"

// Lower is one layer of a stack: either a layer served lazily through FUSE
// or a directory that overlayfs reads directly (an unpacked layer, already
// in the overlay form for whiteouts and opaque directories).
type Lower struct {
	Layer *reader.Layer
	Dir   string
	// Share, for a FUSE layer, is the key under which other processes
	// may use its mount (with Options.SharedDir): equal keys must mean
	// equal file systems. A file name (no slashes). Empty: not shared.
	Share string
}

func (l Lower) name() string {
	if l.Layer != nil {
		return l.Layer.Name()
	}
	return l.Dir
}

// Mount mounts layers (bottom first) read-only through FUSE and an overlay
// of them at target. target must be an existing empty directory. On error
// nothing stays mounted.
func Mount(ctx context.Context, layers []*reader.Layer, target string, o Options) (*Mounted, error) {
	lowers := make([]Lower, len(layers))
	for i, l := range layers {
		lowers[i] = Lower{Layer: l}
	}
	return MountLowers(ctx, lowers, target, o)
}

// MountLowers is Mount for a stack that may mix FUSE layers and
// directories, bottom first.
func MountLowers(ctx context.Context, layers []Lower, target string, o Options) (_ *Mounted, err error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if len(layers) == 0 {
		return nil, errors.New("image has no layers")
	}
	for i, l := range layers {
		if (l.Layer == nil) == (l.Dir == "") {
			return nil, fmt.Errorf("layer %d: want exactly one of a FUSE layer and a directory", i)
		}
		if l.Share != "" && (l.Layer == nil || strings.ContainsAny(l.Share, "/\x00") || l.Share == "." || l.Share == "..") {
			return nil, fmt.Errorf("layer %d: share key %q: want a file name for a FUSE layer", i, l.Share)
		}
	}
	if (o.Upper == "") != (o.Work == "") {
		return nil, errors.New("--upper and --work go together")
	}
	target, err = CheckTarget(target)
	if err != nil {
		return nil, err
	}
	if err := CheckRootless(); err != nil {
		return nil, err
	}
	dir, err := newStateDir(o.StateDir)
	if err != nil {
		return nil, err
	}
	m := &Mounted{Target: target, dir: dir, logger: o.Logger, borrowed: map[*reader.Layer]int{}, passthrough: o.Passthrough}
	defer func() {
		if err != nil {
			if cerr := m.Close(); cerr != nil {
				o.Logger.Warn("cleanup after failed mount", "err", cerr)
			}
		}
	}()

	st := State{PID: os.Getpid(), Ref: o.Ref, Target: target}
	paths := make([]string, len(layers))
	shareKey := func(l Lower) string {
		if o.SharedDir == "" {
			return ""
		}
		return l.Share
	}
	for i, l := range layers {
		paths[i] = filepath.Join(dir, fmt.Sprint(i))
		switch {
		case l.Layer == nil:
		case shareKey(l) != "":
			if d := filepath.Join(o.SharedDir, l.Share); !slices.Contains(st.Shared, d) {
				st.Shared = append(st.Shared, d)
			}
		default:
			st.Layers = append(st.Layers, paths[i])
		}
	}
	// Write the state first: a crash in the middle leaves something umount
	// can find.
	if err := writeState(dir, st); err != nil {
		return nil, err
	}
	fellBack := false
	for i, l := range layers {
		if l.Layer == nil {
			// A directory lower goes in as a symlink in the state dir: the
			// overlay options stay short, and every lowerdir names the
			// state dir, which is how umount finds it.
			if err := os.Symlink(l.Dir, paths[i]); err != nil {
				return nil, err
			}
			continue
		}
		if key := shareKey(l); key != "" {
			// A shared layer goes in as a symlink to its mount, like a
			// directory lower.
			sl, err := m.useShared(o.SharedDir, key, l.Layer)
			switch {
			case err == nil:
				if err := os.Symlink(sl.mnt(), paths[i]); err != nil {
					return nil, err
				}
				continue
			case errors.Is(err, errCannotShare):
				o.Logger.Warn("mounting the layer privately", "layer", l.name(), "err", err)
				st.Layers = append(st.Layers, paths[i])
				fellBack = true
			default:
				return nil, fmt.Errorf("mount shared layer %s: %w", l.name(), err)
			}
		}
		lm, err := mountLayer(l.Layer, paths[i], o.Logger, o.Passthrough)
		if err != nil {
			return nil, fmt.Errorf("mount layer %s: %w", l.name(), err)
		}
		m.mu.Lock()
		m.layers = append(m.layers, lm)
		m.mu.Unlock()
	}
	if fellBack {
		// umount must find the private mounts too.
		if err := writeState(dir, st); err != nil {
			return nil, err
		}
	}
	// Overlay copies the root attributes of each lower when it is mounted:
	// make the kernel ask every FUSE server for them first.
	lowers := make([]string, 0, len(paths)+1)
	// overlayfs refuses a directory twice (images do repeat layers, the
	// empty one most often); only the topmost copy counts anyway, as
	// everything the lower copy holds, the upper one shows again.
	seen := map[string]bool{}
	for i := len(paths) - 1; i >= 0; i-- {
		same := ""
		switch {
		case layers[i].Dir != "":
			same = "dir:" + layers[i].Dir
		case shareKey(layers[i]) != "":
			same = "shared:" + layers[i].Share
		}
		if same != "" {
			if seen[same] {
				continue
			}
			seen[same] = true
		}
		if _, err := os.Stat(paths[i]); err != nil {
			return nil, fmt.Errorf("layer %s does not answer: %w", paths[i], err)
		}
		lowers = append(lowers, paths[i])
	}
	opts := []string{}
	flags := uintptr(0)
	switch {
	case o.Upper != "":
		opts = append(opts, "upperdir="+o.Upper, "workdir="+o.Work)
	case o.Writable:
		upper, work := filepath.Join(dir, "upper"), filepath.Join(dir, "work")
		for _, d := range []string{upper, work} {
			if err := os.Mkdir(d, 0o755); err != nil {
				return nil, err
			}
		}
		opts = append(opts, "upperdir="+upper, "workdir="+work)
	default:
		flags |= unix.MS_RDONLY
		if len(lowers) == 1 {
			// A read-only overlay needs two lowers.
			empty := filepath.Join(dir, "empty")
			if err := os.Mkdir(empty, 0o755); err != nil {
				return nil, err
			}
			lowers = append(lowers, empty)
		}
	}
	opts = append([]string{"lowerdir=" + strings.Join(lowers, ":")}, opts...)
	data := strings.Join(opts, ",")
	if len(data) >= os.Getpagesize() {
		return nil, fmt.Errorf("overlay options are %d bytes, over the kernel's limit of %d: use a shorter --cache-dir", len(data), os.Getpagesize())
	}
	if Rootless() {
		if flags&unix.MS_RDONLY != 0 {
			data += ",ro"
		}
		m.mu.Lock()
		err = m.fuseOverlay(target, data)
		m.mu.Unlock()
		if err != nil {
			return nil, err
		}
	} else if err := unix.Mount("overlay", target, "overlay", flags, data); err != nil {
		return nil, fmt.Errorf("mount overlay at %s: %w", target, err)
	}
	m.mu.Lock()
	m.overlay = true
	m.mu.Unlock()
	return m, nil
}

// useShared makes this mount a user of the shared layer key, mounting and
// serving l if no other process does. An image repeating the layer uses
// it once.
func (m *Mounted) useShared(sharedDir, key string, l *reader.Layer) (*sharedLayer, error) {
	dir := filepath.Join(sharedDir, key)
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, sl := range m.shared {
		if sl.dir == dir {
			if sl.lm == nil {
				m.borrowed[l] = sl.pid
			}
			return sl, nil
		}
	}
	sl, err := acquireShared(sharedDir, key, l, m.logger, m.passthrough)
	if err != nil {
		return nil, err
	}
	m.shared = append(m.shared, sl)
	if sl.lm == nil {
		m.borrowed[l] = sl.pid
		m.logger.Info("using the shared mount of a layer another process serves", "layer", l.Name(), "path", sl.mnt(), "server", sl.pid)
	}
	return sl, nil
}

// Borrowed reports whether layer l is served by another process, whose
// mount of it this one shares, and that process's pid (0 if unknown). Its
// reads are that process's: they do not show in l's counters.
func (m *Mounted) Borrowed(l *reader.Layer) (pid int, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	pid, ok = m.borrowed[l]
	return pid, ok
}

// Dir is the per-mount state directory.
func (m *Mounted) Dir() string { return m.dir }

// Wait blocks until a layer's FUSE server stops (because its mount was
// removed from outside) or ctx is done.
func (m *Mounted) Wait(ctx context.Context) error {
	m.mu.Lock()
	layers := slices.Clone(m.layers)
	var borrowed []*sharedLayer
	for _, sl := range m.shared {
		if sl.lm != nil {
			layers = append(layers, sl.lm)
		} else {
			borrowed = append(borrowed, sl)
		}
	}
	m.mu.Unlock()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	for _, sl := range borrowed {
		go sl.watchServer(watchCtx, m.logger)
	}
	cases := make(chan error, len(layers))
	for _, lm := range layers {
		go func(lm *layerMount) {
			err := <-lm.served
			lm.served <- err // leave it for Close
			cases <- err
		}(lm)
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-cases:
		if err != nil {
			return err
		}
		return errors.New("a layer was unmounted from outside")
	case err := <-m.overlayDone():
		return fmt.Errorf("fuse-overlayfs exited (unmounted from outside?): %v", err)
	}
}

// Close unmounts the overlay and every layer and removes the state
// directory. A busy mount is detached lazily, with a warning, so nothing
// stays visible.
//
// A shared layer this process serves that other processes still use stays
// mounted: Close removes the state directory (the overlay is gone by then)
// and serves on, returning once the last of them released it.
func (m *Mounted) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	var errs []error
	if m.overlay {
		if err := unmount(m.Target, m.logger); err != nil {
			errs = append(errs, err)
		}
		if err := m.stopFuseOverlay(); err != nil {
			errs = append(errs, err)
		}
		m.overlay = false
	}
	for i := len(m.layers) - 1; i >= 0; i-- {
		lm := m.layers[i]
		if err := unmount(lm.dir, m.logger); err != nil {
			errs = append(errs, err)
		}
		if err := lm.stop(); err != nil {
			errs = append(errs, err)
		}
	}
	m.layers = nil
	var serving []*sharedLayer
	for _, sl := range m.shared {
		sl.releaseUser()
		if sl.lm == nil {
			if err := releaseOrphan(sl.dir, m.logger); err != nil {
				errs = append(errs, fmt.Errorf("release shared layer %s: %w", sl.dir, err))
			}
			continue
		}
		done, err := sl.tryFinish(m.logger)
		if err != nil {
			errs = append(errs, fmt.Errorf("unmount shared layer %s: %w", sl.dir, err))
		}
		if !done {
			serving = append(serving, sl)
		}
	}
	m.shared = nil
	if len(errs) == 0 {
		if err := os.RemoveAll(m.dir); err != nil {
			errs = append(errs, err)
		}
	}
	if len(serving) > 0 {
		errs = append(errs, serveShared(serving, m.logger))
	}
	return errors.Join(errs...)
}

// sharedPoll is how often a server whose overlay is gone checks whether
// the other users of its layers have gone too.
const sharedPoll = 100 * time.Millisecond

// serveShared serves shared layers that other processes use until each
// is released, then unmounts it.
func serveShared(serving []*sharedLayer, logger *slog.Logger) error {
	for _, sl := range serving {
		logger.Info("shared layer still used by another mount; serving until it is released", "layer", sl.name, "path", sl.mnt())
	}
	var errs []error
	for len(serving) > 0 {
		time.Sleep(sharedPoll)
		left := serving[:0]
		for _, sl := range serving {
			if sl.stopped() {
				// Unmounted from outside: nothing left to serve.
				logger.Warn("shared layer was unmounted from outside", "layer", sl.name, "path", sl.mnt())
				sl.lm.conn.Close()
				sl.closeLocks()
				continue
			}
			done, err := sl.tryFinish(logger)
			switch {
			case err != nil && done:
				errs = append(errs, fmt.Errorf("unmount shared layer %s: %w", sl.dir, err))
			case err != nil:
				// Keep serving: the other users still read through it.
				logger.Warn("checking the users of a shared layer", "layer", sl.name, "err", err)
				left = append(left, sl)
			case done:
				logger.Info("last user of a shared layer gone; unmounted it", "layer", sl.name)
			default:
				left = append(left, sl)
			}
		}
		serving = left
	}
	return errors.Join(errs...)
}

func mountLayer(l *reader.Layer, dir string, logger *slog.Logger, passthrough bool) (*layerMount, error) {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, err
	}
	opts := []fuse.MountOption{
		fuse.FSName("stargz-mount"),
		fuse.Subtype("stargz"),
		fuse.ReadOnly(),
		fuse.DefaultPermissions(),
		fuse.MaxReadahead(1 << 20),
		fuse.MaxPages(256), // reads of up to 1 MiB rather than 128 KiB
		fuse.AsyncRead(),
	}
	if os.Geteuid() == 0 {
		opts = append(opts, fuse.AllowOther(), fuse.AllowDev(), fuse.AllowSUID())
		if passthrough { // registering backing files needs CAP_SYS_ADMIN
			opts = append(opts, fuse.Passthrough())
		}
	}
	c, err := fuse.Mount(dir, opts...)
	if err != nil {
		return nil, fuseError(err)
	}
	fsys := NewLayerFS(l, logger)
	if c.Passthrough() {
		fsys.pt = newPassthrough(c, l, logger)
	}
	lm := &layerMount{dir: dir, conn: c, served: make(chan error, 1)}
	go func() {
		err := fs.Serve(c, fsys)
		fsys.Close()
		lm.served <- err
	}()
	return lm, nil
}

// stop waits for the FUSE server to stop after its mount was removed and
// closes the connection. A server still running after 10 s (a lazily
// detached mount still in use) is left to end with the process: closing
// its connection would wait for its pending read of /dev/fuse forever.
func (lm *layerMount) stop() error {
	select {
	case err := <-lm.served:
		lm.served <- err // leave it for Wait
		lm.conn.Close()
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("FUSE server of %s did not stop", lm.dir)
	}
}

// fuseError explains the common reasons FUSE mounts fail.
func fuseError(err error) error {
	if _, serr := os.Stat("/dev/fuse"); serr != nil {
		return fmt.Errorf("%w: /dev/fuse is missing (load the fuse kernel module)", err)
	}
	if errors.Is(err, os.ErrNotExist) || strings.Contains(err.Error(), "fusermount") {
		return fmt.Errorf("%w: is fusermount3 installed (Debian package fuse3)?", err)
	}
	return err
}

// CheckTarget makes sure target is an existing empty directory that is not
// already a mount point, and returns its absolute path.
func CheckTarget(target string) (string, error) {
	abs, err := filepath.Abs(target)
	if err != nil {
		return "", err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("mountpoint %s does not exist: create it with mkdir", target)
		}
		return "", fmt.Errorf("mountpoint %s: %w", target, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("mountpoint %s is not a directory", target)
	}
	ents, err := os.ReadDir(abs)
	if err != nil {
		return "", fmt.Errorf("mountpoint %s: %w", target, err)
	}
	if len(ents) > 0 {
		return "", fmt.Errorf("mountpoint %s is not empty", target)
	}
	if mounted, _ := isMountPoint(abs); mounted {
		return "", fmt.Errorf("mountpoint %s is already a mount point", target)
	}
	return abs, nil
}

func newStateDir(base string) (string, error) {
	if base == "" {
		return "", errors.New("no state directory given")
	}
	root := filepath.Join(base, "m")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return "", fmt.Errorf("create state directory: %w", err)
	}
	var b [4]byte
	rand.Read(b[:])
	dir := filepath.Join(root, hex.EncodeToString(b[:]))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("create state directory: %w", err)
	}
	return dir, nil
}

func writeState(dir string, st State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, stateFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, stateFile))
}
