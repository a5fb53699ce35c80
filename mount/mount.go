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
}

// Mounted is a mounted stack: one FUSE mount per layer and an overlay.
type Mounted struct {
	Target string
	dir    string // the per-mount state directory
	logger *slog.Logger

	mu      sync.Mutex // guards layers, overlay, closed, overlayProc and overlayExited
	layers  []*layerMount
	overlay bool
	closed  bool
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
	Layers []string `json:"layers"` // layer mount points, bottom first
}

const stateFile = "state.json"

// Lower is one layer of a stack: either a layer served lazily through FUSE
// or a directory that overlayfs reads directly (an unpacked layer, already
// in the overlay form for whiteouts and opaque directories).
type Lower struct {
	Layer *reader.Layer
	Dir   string
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
	m := &Mounted{Target: target, dir: dir, logger: o.Logger}
	defer func() {
		if err != nil {
			if cerr := m.Close(); cerr != nil {
				o.Logger.Warn("cleanup after failed mount", "err", cerr)
			}
		}
	}()

	st := State{PID: os.Getpid(), Ref: o.Ref, Target: target}
	paths := make([]string, len(layers))
	for i, l := range layers {
		paths[i] = filepath.Join(dir, fmt.Sprint(i))
		if l.Layer != nil {
			st.Layers = append(st.Layers, paths[i])
		}
	}
	// Write the state first: a crash in the middle leaves something umount
	// can find.
	if err := writeState(dir, st); err != nil {
		return nil, err
	}
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
		lm, err := mountLayer(l.Layer, paths[i], o.Logger)
		if err != nil {
			return nil, fmt.Errorf("mount layer %s: %w", l.name(), err)
		}
		m.mu.Lock()
		m.layers = append(m.layers, lm)
		m.mu.Unlock()
	}
	// Overlay copies the root attributes of each lower when it is mounted:
	// make the kernel ask every FUSE server for them first.
	lowers := make([]string, 0, len(paths)+1)
	for i := len(paths) - 1; i >= 0; i-- {
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

// Dir is the per-mount state directory.
func (m *Mounted) Dir() string { return m.dir }

// Wait blocks until a layer's FUSE server stops (because its mount was
// removed from outside) or ctx is done.
func (m *Mounted) Wait(ctx context.Context) error {
	m.mu.Lock()
	layers := m.layers
	m.mu.Unlock()
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
	}
}

// Close unmounts the overlay and every layer and removes the state
// directory. A busy mount is detached lazily, with a warning, so nothing
// stays visible.
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
		select {
		case <-lm.served:
		case <-time.After(10 * time.Second):
			errs = append(errs, fmt.Errorf("FUSE server of %s did not stop", lm.dir))
		}
		lm.conn.Close()
	}
	m.layers = nil
	if len(errs) == 0 {
		if err := os.RemoveAll(m.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func mountLayer(l *reader.Layer, dir string, logger *slog.Logger) (*layerMount, error) {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, err
	}
	opts := []fuse.MountOption{
		fuse.FSName("stargz-mount"),
		fuse.Subtype("stargz"),
		fuse.ReadOnly(),
		fuse.DefaultPermissions(),
		fuse.MaxReadahead(1 << 20),
		fuse.AsyncRead(),
	}
	if os.Geteuid() == 0 {
		opts = append(opts, fuse.AllowOther(), fuse.AllowDev(), fuse.AllowSUID())
	}
	c, err := fuse.Mount(dir, opts...)
	if err != nil {
		return nil, fuseError(err)
	}
	lm := &layerMount{dir: dir, conn: c, served: make(chan error, 1)}
	go func() { lm.served <- fs.Serve(c, NewLayerFS(l, logger)) }()
	return lm, nil
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
