package mount

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
	"github.com/stargz-mount/stargz-mount/reader"
)

// openLayer opens an eStargz layer of entries from memory.
func openLayer(t *testing.T, name string, entries ...lt.Entry) *reader.Layer {
	t.Helper()
	b, err := lt.Estargz(lt.Tar(entries...))
	if err != nil {
		t.Fatal(err)
	}
	l, err := reader.Open(context.Background(), bytes.NewReader(b.Data), reader.WithName(name), reader.WithTOCDigest(digest.Digest(b.TOCDigest)))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestSharedLayerLifecycle runs two stacks sharing a layer in one process
// (flocks are per open file, so they count as two users): the first serves
// it, the second borrows it; closing the first unmounts its overlay but
// serves on until the second is closed.
func TestSharedLayerLifecycle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount overlayfs (CI runs this as root)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
	shared := openLayer(t, "shared", lt.Dir("s"), lt.FileString("s/f", "shared\n"))
	sharedAgain := openLayer(t, "shared", lt.Dir("s"), lt.FileString("s/f", "shared\n"))
	top1 := openLayer(t, "top1", lt.FileString("one", "1\n"))
	top2 := openLayer(t, "top2", lt.FileString("two", "2\n"))
	base := t.TempDir()
	sharedDir := filepath.Join(base, "layers")
	o := Options{StateDir: filepath.Join(base, "state"), SharedDir: sharedDir}
	target := func(n string) string {
		d := filepath.Join(base, n)
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	t1, t2 := target("t1"), target("t2")
	m1, err := MountLowers(context.Background(), []Lower{{Layer: shared, Share: "k"}, {Layer: top1, Share: "k1"}}, t1, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m1.Close() })
	// The image repeats the shared layer: one use of it.
	m2, err := MountLowers(context.Background(), []Lower{{Layer: sharedAgain, Share: "k"}, {Layer: top2, Share: "k2"}, {Layer: sharedAgain, Share: "k"}}, t2, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m2.Close() })
	if _, ok := m1.Borrowed(shared); ok {
		t.Error("the first stack borrows the shared layer")
	}
	if pid, ok := m2.Borrowed(sharedAgain); !ok || pid != os.Getpid() {
		t.Errorf("second stack: Borrowed = %d, %v; want this process", pid, ok)
	}
	if _, ok := m2.Borrowed(top2); ok {
		t.Error("the second stack borrows its own layer")
	}
	mnt := filepath.Join(sharedDir, "k", sharedMnt)
	read := func(p, want string) {
		t.Helper()
		if b, err := os.ReadFile(p); err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", p, b, err, want)
		}
	}
	read(filepath.Join(t1, "s/f"), "shared\n")
	read(filepath.Join(t2, "s/f"), "shared\n")
	read(filepath.Join(t2, "two"), "2\n")

	closed := make(chan error, 1)
	go func() { closed <- m1.Close() }()
	for i := 0; ; i++ {
		if ok, _ := isMountPoint(t1); !ok {
			break
		}
		if i == 200 {
			t.Fatal("first overlay still mounted")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close of the serving stack returned while the layer is in use: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if ok, _ := isMountPoint(mnt); !ok {
		t.Fatal("shared layer unmounted while in use")
	}
	if ok, _ := isMountPoint(filepath.Join(sharedDir, "k1", sharedMnt)); ok {
		t.Error("the first stack's own layer is still mounted")
	}
	read(filepath.Join(t2, "s/f"), "shared\n")

	if err := m2.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close of the serving stack did not return after the last user went")
	}
	if ents, _ := os.ReadDir(sharedDir); len(ents) != 0 {
		t.Errorf("left in the shared dir: %v", ents)
	}
	if ents, _ := os.ReadDir(filepath.Join(o.StateDir, "m")); len(ents) != 0 {
		t.Errorf("state left: %v", ents)
	}
}

// TestSharedLayerFallsBackToPrivate: a layer whose server lives but whose
// mount this process cannot see (another mount namespace) is mounted
// privately, and umount finds that mount.
func TestSharedLayerFallsBackToPrivate(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount overlayfs (CI runs this as root)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
	l := openLayer(t, "l", lt.FileString("f", "private\n"))
	base := t.TempDir()
	sharedDir := filepath.Join(base, "layers")
	// "Another process" serves the layer somewhere this one cannot see.
	serve, err := lockFile(filepath.Join(sharedDir, "k"), serveLock, unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	defer serve.Close()
	target := filepath.Join(base, "t")
	os.Mkdir(target, 0o755)
	m, err := MountLowers(context.Background(), []Lower{{Layer: l, Share: "k"}}, target, Options{StateDir: filepath.Join(base, "state"), SharedDir: sharedDir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if b, err := os.ReadFile(filepath.Join(target, "f")); err != nil || string(b) != "private\n" {
		t.Errorf("f = %q, %v", b, err)
	}
	if _, ok := m.Borrowed(l); ok {
		t.Error("a privately mounted layer counts as borrowed")
	}
	st, err := readState(m.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Layers) != 1 || st.Layers[0] != filepath.Join(m.Dir(), "0") {
		t.Errorf("state layers %q, want the private mount", st.Layers)
	}
	if ok, _ := isMountPoint(st.Layers[0]); !ok {
		t.Error("no private layer mount")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if ok, _ := isMountPoint(target); ok {
		t.Error("still mounted")
	}
}

// TestSharedLayerDirReplaced: a server whose layer directory was removed
// from outside and made anew by another server leaves the new one alone at
// its Close, and does not wait for its users.
func TestSharedLayerDirReplaced(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount overlayfs (CI runs this as root)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
	base := t.TempDir()
	sharedDir := filepath.Join(base, "layers")
	o := Options{StateDir: filepath.Join(base, "state"), SharedDir: sharedDir}
	mountOne := func(name string) *Mounted {
		target := filepath.Join(base, name)
		os.Mkdir(target, 0o755)
		m, err := MountLowers(context.Background(), []Lower{{Layer: openLayer(t, "l", lt.FileString("f", "x\n")), Share: "k"}}, target, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	m1 := mountOne("t1")
	dir := filepath.Join(sharedDir, "k")
	mnt := filepath.Join(dir, sharedMnt)
	if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	removeShared(dir)
	m2 := mountOne("t2")
	m2.mu.Lock()
	borrowed := len(m2.borrowed)
	m2.mu.Unlock()
	if borrowed != 0 {
		t.Fatal("the second stack borrows a layer whose directory was removed")
	}
	closed := make(chan error, 1)
	go func() { closed <- m1.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close waits for the users of a mount that is not its own")
	}
	if ok, _ := isMountPoint(mnt); !ok {
		t.Error("the new server's mount is gone")
	}
	if b, err := os.ReadFile(filepath.Join(m2.Target, "f")); err != nil || string(b) != "x\n" {
		t.Errorf("read through the new mount: %q, %v", b, err)
	}
	if err := m2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("layer directory left: %v", err)
	}
}
