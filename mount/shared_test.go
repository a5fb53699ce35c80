package mount

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// TestLockFileFollowsRemoval: a process that waited for the setup lock of
// a shared layer its last user removed meanwhile ends up holding the lock
// of the file now at the path, not of the unlinked one.
func TestLockFileFollowsRemoval(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "layer")
	held, err := lockFile(dir, setupLock, unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *os.File)
	go func() {
		f, err := lockFile(dir, setupLock, unix.LOCK_EX)
		if err != nil {
			t.Error(err)
		}
		got <- f
	}()
	time.Sleep(50 * time.Millisecond) // let it block on the old file
	removeShared(dir)
	held.Close()
	f := <-got
	if f == nil {
		return
	}
	defer f.Close()
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Join(dir, setupLock), &b); err != nil {
		t.Fatalf("no setup lock at the path: %v", err)
	}
	if a.Ino != b.Ino {
		t.Errorf("locked inode %d, the path's is %d", a.Ino, b.Ino)
	}
}

// TestReleaseOrphan: a shared layer is removed by releaseOrphan only when
// nobody uses it and its server is gone.
func TestReleaseOrphan(t *testing.T) {
	tests := []struct {
		name       string
		hold       string // lock file held by "another process"
		how        int
		wantRemove bool
	}{
		{"unused, server gone", "", 0, true},
		{"still used", usersLock, unix.LOCK_SH, false},
		{"server alive", serveLock, unix.LOCK_EX, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "layer")
			if err := os.MkdirAll(filepath.Join(dir, sharedMnt), 0o755); err != nil {
				t.Fatal(err)
			}
			if tt.hold != "" {
				// A separate open file description: conflicts like
				// another process's lock.
				f, err := lockFile(dir, tt.hold, tt.how)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
			}
			if err := releaseOrphan(dir, slog.Default()); err != nil {
				t.Fatal(err)
			}
			_, err := os.Stat(dir)
			if removed := os.IsNotExist(err); removed != tt.wantRemove {
				t.Errorf("removed = %v, want %v", removed, tt.wantRemove)
			}
		})
	}
	// Nothing to do for a layer already removed.
	if err := releaseOrphan(filepath.Join(t.TempDir(), "gone"), slog.Default()); err != nil {
		t.Errorf("releaseOrphan of a removed layer: %v", err)
	}
}

// TestAcquireSharedFailureCleansUp: a process that fails to mount a shared
// layer it was to serve leaves no locks behind.
func TestAcquireSharedFailureCleansUp(t *testing.T) {
	l := openLayer(t, "l", lt.FileString("f", "x"))
	shared := t.TempDir()
	dir := filepath.Join(shared, "k")
	// A non-empty directory where the mount point goes: mounting fails.
	if err := os.MkdirAll(filepath.Join(dir, sharedMnt, "junk"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := acquireShared(shared, "k", l, slog.Default(), false); err == nil {
		t.Fatal("acquireShared succeeded")
	}
	for _, f := range []string{setupLock, usersLock, serveLock} {
		if _, err := os.Stat(filepath.Join(dir, f)); !os.IsNotExist(err) {
			t.Errorf("%s left: %v", f, err)
		}
	}
}
