package mount

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stargz-mount/stargz-mount/reader"
)

// Shared layers: processes that mount images with a layer in common use one
// FUSE mount of it. Each shared layer has a directory in Options.SharedDir,
// named after the layer's share key (see Lower.Share):
//
//	setup.lock  flock(LOCK_EX) while a process looks up, mounts or removes
//	            the layer mount; held only briefly
//	users.lock  flock(LOCK_SH) by every process whose overlay uses the layer,
//	            for as long as it does
//	serve.lock  flock(LOCK_EX) by the process serving the mount, for as long
//	            as it serves it; holds the server's pid, for people
//	mnt/        the FUSE mount
//
// The kernel drops a process's flocks when it dies, so a killed user leaves
// no reference behind and a killed server is told by a serve.lock anyone
// can lock. The server unmounts the layer once it can lock users.lock
// exclusively (nobody uses it) while holding setup.lock (nobody is about to
// start to); a user that finds itself the last one of a layer whose server
// is dead removes the dead mount.
const (
	setupLock = "setup.lock"
	usersLock = "users.lock"
	serveLock = "serve.lock"
	sharedMnt = "mnt"
)

// errCannotShare is a shared layer that has a live server whose mount
// this process cannot use; it mounts the layer privately instead.
var errCannotShare = errors.New("cannot use the shared layer mount")

// sharedLayer is one shared layer this process uses.
type sharedLayer struct {
	name  string   // the layer's name, for logs
	dir   string   // the layer's directory in the shared dir
	user  *os.File // users.lock, locked shared; nil once released
	serve *os.File // serve.lock, locked exclusively; nil unless serving
	lm    *layerMount
	dev   string // maj:min of the mount this process made
	pid   int    // the serving process (this one, if serving)
	// stDev is the device of the borrowed mount (its root's st_dev), by
	// which watchServer tells it from a mount that replaced it.
	stDev uint64
}

func (s *sharedLayer) mnt() string { return filepath.Join(s.dir, sharedMnt) }

// lockFile opens (creating) dir/name and flocks it with how (LOCK_EX or
// LOCK_SH, maybe with LOCK_NB). It makes sure the file it locked is still
// the one at that path, since the last user of a layer removes the files:
// a lock on an unlinked file guards nothing.
func lockFile(dir, name string, how int) (*os.File, error) {
	path := filepath.Join(dir, name)
	for {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("shared layer directory: %w", err)
		}
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if errors.Is(err, os.ErrNotExist) {
			continue // dir removed in between
		}
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		if err := flock(f, how); err != nil {
			f.Close()
			return nil, err
		}
		if sameFile(f, path) {
			return f, nil
		}
		f.Close()
	}
}

// sameFile reports whether f is the file at path.
func sameFile(f *os.File, path string) bool {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return false
	}
	return unix.Stat(path, &b) == nil && a.Ino == b.Ino && a.Dev == b.Dev
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("flock %s: %w", f.Name(), err)
		}
		return nil
	}
}

// wouldBlock reports whether a LOCK_NB flock failed because another holds
// the lock.
func wouldBlock(err error) bool { return errors.Is(err, unix.EWOULDBLOCK) }

// acquireShared makes this process a user of the shared layer with key
// key: it uses a live mount of it if there is one, and otherwise mounts
// and serves l itself (removing a dead mount left by a killed server
// first).
func acquireShared(sharedDir, key string, l *reader.Layer, logger *slog.Logger, passthrough bool) (_ *sharedLayer, err error) {
	s := &sharedLayer{name: l.Name(), dir: filepath.Join(sharedDir, key)}
	setup, err := lockFile(s.dir, setupLock, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer setup.Close()
	defer func() {
		if err == nil {
			return
		}
		server := s.serve != nil
		s.closeLocks()
		if !server {
			return
		}
		// Nothing of ours is mounted now: leave no directory behind
		// unless a user of an earlier, dead mount is still there.
		if users, err := lockFile(s.dir, usersLock, unix.LOCK_EX|unix.LOCK_NB); err == nil {
			removeShared(s.dir)
			users.Close()
		}
	}()
	mnt := s.mnt()
	mi, mounted, err := mountAt(mnt)
	if err != nil {
		return nil, err
	}
	serve, err := lockFile(s.dir, serveLock, unix.LOCK_EX|unix.LOCK_NB)
	switch {
	case err == nil:
		s.serve = serve
	case !wouldBlock(err):
		return nil, err
	case !mounted:
		// Its server lives, but this process does not see the mount:
		// another mount namespace, or it was unmounted from outside and
		// its server is about to notice.
		return nil, fmt.Errorf("%w: a process serves %s, but it is not mounted here", errCannotShare, s.dir)
	}
	if s.serve == nil {
		// A live server: use its mount if it answers.
		var st unix.Stat_t
		if err := unix.Stat(mnt, &st); err != nil {
			return nil, fmt.Errorf("%w: shared layer mount %s does not answer: %v", errCannotShare, mnt, err)
		}
		s.stDev = st.Dev
		s.pid = serverPID(s.dir)
	} else {
		if mounted {
			logger.Info("removing a shared layer mount whose server is gone", "layer", l.Name(), "path", mnt, "dev", mi.dev)
			if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
				return nil, fmt.Errorf("remove dead shared layer mount %s: %w", mnt, err)
			}
			// Mounts still holding the dead mount hold users.lock: a new
			// one counts only the users of the new mount, so this process
			// need not serve on for mounts that do not use it.
			if err := os.Remove(filepath.Join(s.dir, usersLock)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("reset users of shared layer %s: %w", s.dir, err)
			}
		}
		os.Remove(mnt) // an empty mount point left behind
		lm, err := mountLayer(l, mnt, logger, passthrough)
		if err != nil {
			return nil, err
		}
		s.lm = lm
		// Other processes find it as soon as the setup lock goes: make
		// sure it answers, and note which mount is ours.
		if _, err := os.Stat(mnt); err != nil {
			s.unmountOwn(logger)
			return nil, fmt.Errorf("layer %s does not answer: %w", mnt, err)
		}
		if mi, ok, _ := mountAt(mnt); ok {
			s.dev = mi.dev
		}
		s.pid = os.Getpid()
		if err := writePID(s.serve); err != nil {
			logger.Warn("record the server of a shared layer", "path", s.serve.Name(), "err", err)
		}
	}
	s.user, err = lockFile(s.dir, usersLock, unix.LOCK_SH)
	if err != nil {
		if s.lm != nil {
			s.unmountOwn(logger)
		}
		return nil, err
	}
	return s, nil
}

func writePID(f *os.File) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return err
}

// serverPID is the pid the server of the shared layer in dir wrote, or 0.
func serverPID(dir string) int {
	b, _ := os.ReadFile(filepath.Join(dir, serveLock))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func (s *sharedLayer) closeLocks() {
	if s.user != nil {
		s.user.Close()
		s.user = nil
	}
	if s.serve != nil {
		s.serve.Close()
		s.serve = nil
	}
}

// releaseUser drops this process's use of the layer: its overlay no longer
// uses it.
func (s *sharedLayer) releaseUser() {
	if s.user != nil {
		s.user.Close()
		s.user = nil
	}
}

// unmountOwn unmounts the mount this process serves, if it is still the
// one at mnt, and waits for its server to stop. The caller made sure no
// live process uses it (it holds users.lock exclusively, or mounting just
// failed): a reference left is the overlay of a killed process, which
// would keep the FUSE connection, and so this process, alive for good.
// MNT_FORCE aborts the connection first.
func (s *sharedLayer) unmountOwn(logger *slog.Logger) error {
	var errs []error
	if mi, ok, _ := mountAt(s.mnt()); ok && (s.dev == "" || mi.dev == s.dev) {
		if err := unix.Unmount(s.mnt(), unix.MNT_FORCE); err != nil {
			if err := unmount(s.mnt(), logger); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := s.lm.stop(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// tryFinish unmounts the layer this process serves if no other process
// uses it; done reports whether it did. The caller released its own use.
func (s *sharedLayer) tryFinish(logger *slog.Logger) (done bool, err error) {
	setup, err := lockFile(s.dir, setupLock, unix.LOCK_EX)
	if err != nil {
		return false, err
	}
	defer setup.Close()
	if !sameFile(s.serve, filepath.Join(s.dir, serveLock)) {
		// The layer's directory was removed from outside and maybe made
		// anew: whatever is there now is not ours.
		err := s.unmountOwn(logger)
		s.closeLocks()
		return true, err
	}
	users, err := lockFile(s.dir, usersLock, unix.LOCK_EX|unix.LOCK_NB)
	if wouldBlock(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer users.Close()
	err = s.unmountOwn(logger)
	s.closeLocks()
	if err == nil {
		removeShared(s.dir)
	}
	return true, err
}

// stopped reports whether the FUSE server of a layer this process serves
// stopped (its mount was removed from outside).
func (s *sharedLayer) stopped() bool {
	select {
	case err := <-s.lm.served:
		s.lm.served <- err
		return true
	default:
		return false
	}
}

// releaseOrphan removes the shared layer in dir if nobody uses it any more
// and its server is dead: the last user of a layer whose server was killed
// cleans up after it. A layer whose server lives is the server's to
// remove (one that does not answer still holds its own users.lock, so
// nothing here could tell a layer it serves for nobody else).
func releaseOrphan(dir string, logger *slog.Logger) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	setup, err := lockFile(dir, setupLock, unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer setup.Close()
	users, err := lockFile(dir, usersLock, unix.LOCK_EX|unix.LOCK_NB)
	if wouldBlock(err) {
		return nil // still in use
	}
	if err != nil {
		return err
	}
	defer users.Close()
	serve, err := lockFile(dir, serveLock, unix.LOCK_EX|unix.LOCK_NB)
	if wouldBlock(err) {
		return nil // its server lives and will remove it
	}
	if err != nil {
		return err
	}
	defer serve.Close()
	mnt := filepath.Join(dir, sharedMnt)
	if ok, _ := isMountPoint(mnt); ok {
		logger.Info("removing a shared layer mount whose server is gone", "path", mnt)
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("remove dead shared layer mount %s: %w", mnt, err)
		}
	}
	removeShared(dir)
	return nil
}

// removeShared removes an unused shared layer's directory. The caller
// holds its setup lock; setup.lock goes last, so that processes waiting
// for it notice (lockFile) and start over.
func removeShared(dir string) {
	os.Remove(filepath.Join(dir, sharedMnt)) // fails if still a mount point
	os.Remove(filepath.Join(dir, usersLock))
	os.Remove(filepath.Join(dir, serveLock))
	os.Remove(filepath.Join(dir, setupLock))
	os.Remove(dir) // fails if a newcomer made a new setup.lock already
}

// serverWatch is how often a mount checks that the process serving a
// layer it borrows is alive.
const serverWatch = 2 * time.Second

// watchServer logs, once, when the process serving a layer this one
// borrows dies: the layer's mount is dead from then on, and so is this
// mount for whatever the kernel has not cached. A dead mount fails statfs
// (which the kernel never answers from its cache) with ENOTCONN; a mount
// that replaced it has another device. It takes no lock, so it cannot get
// in the way of a process setting the layer up, and it does not trust the
// pid, which may be of another pid namespace.
func (s *sharedLayer) watchServer(ctx context.Context, logger *slog.Logger) {
	t := time.NewTicker(serverWatch)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var st unix.Stat_t
		err := unix.Stat(s.mnt(), &st)
		if err == nil && st.Dev != s.stDev {
			err = errors.New("another mount replaced it")
		}
		if err == nil {
			var fs unix.Statfs_t
			err = unix.Statfs(s.mnt(), &fs)
		}
		if err != nil && ctx.Err() == nil {
			logger.Warn("the process serving a shared layer of this mount is gone: reads of what the kernel has not cached fail; unmount and mount again",
				"layer", s.name, "server", s.pid, "path", s.mnt(), "err", err)
			return
		}
	}
}
