package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
	"github.com/stargz-mount/stargz-mount/stats"
)

// sharedImages are two images with one eStargz layer in common (the same
// blob) and a top layer of their own each.
type sharedImages struct {
	refA, refB string
	shared     *lt.Blob
	// wantShared are the shared layer's files; wantA and wantB what each
	// image shows of its own layer (B's also replaces a shared file).
	wantShared, wantA, wantB map[string][]byte
}

func buildSharedImages(t *testing.T, host string) sharedImages {
	t.Helper()
	s := sharedImages{refA: host + "/shared-a:1", refB: host + "/shared-b:1",
		wantShared: map[string][]byte{}, wantA: map[string][]byte{}, wantB: map[string][]byte{}}
	// Fresh bytes each run: nothing of an earlier run can be in a cache.
	salt := fmt.Sprint(time.Now().UnixNano())
	entries := []lt.Entry{lt.Dir("shared")}
	for i := range 8 {
		name := fmt.Sprintf("shared/f%d", i)
		s.wantShared[name] = lt.Random(salt+name, 200<<10+i*977)
		entries = append(entries, lt.File(name, s.wantShared[name]))
	}
	build := func(entries ...lt.Entry) *lt.Blob {
		b, err := lt.Estargz(lt.Tar(entries...))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	s.shared = build(entries...)
	s.wantA["a/only"] = lt.Random(salt+"a", 100<<10)
	s.wantB["b/only"] = lt.Random(salt+"b", 100<<10)
	s.wantB["shared/f0"] = []byte("replaced in b\n")
	a := build(lt.Dir("a"), lt.File("a/only", s.wantA["a/only"]))
	b := build(lt.Dir("b"), lt.File("b/only", s.wantB["b/only"]), lt.Dir("shared"), lt.File("shared/f0", s.wantB["shared/f0"]))
	for ref, top := range map[string]*lt.Blob{s.refA: a, s.refB: b} {
		img, err := lt.Image(s.shared, top)
		if err != nil {
			t.Fatal(err)
		}
		lt.Push(t, img, ref)
	}
	return s
}

// want is what image A (b false) or B (b true) shows.
func (s sharedImages) want(b bool) map[string][]byte {
	m := map[string][]byte{}
	for k, v := range s.wantShared {
		m[k] = v
	}
	own := s.wantA
	if b {
		own = s.wantB
	}
	for k, v := range own {
		m[k] = v
	}
	return m
}

// sharedMnt is where the shared layer of s is mounted for mounts using
// cache dir cache.
func (s sharedImages) sharedMnt(t *testing.T, cache string) string {
	t.Helper()
	abs, err := filepath.Abs(cache)
	if err != nil {
		t.Fatal(err)
	}
	key := shareKey(abs, s.shared.Digest.String(), s.shared.TOCDigest, false)
	return filepath.Join(stats.RuntimeDir(), "layers", key, "mnt")
}

// pair makes two environments sharing a cache dir, and returns them with
// where their shared layer is mounted, which is lazily unmounted and
// removed at the end as a last resort (after the servers were killed).
func (s sharedImages) pair(t *testing.T) (a, b *env, mnt string) {
	t.Helper()
	a = newEnv(t)
	b = a.sibling()
	mnt = s.sharedMnt(t, a.cache)
	t.Cleanup(func() {
		if fuseMountsAt(t, mnt) > 0 {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
		os.RemoveAll(filepath.Dir(mnt))
	})
	return a, b, mnt
}

// server is a stargz-mount serving in the foreground, as a test started it.
type server struct {
	cmd    *exec.Cmd
	log    string
	exited chan struct{} // closed once cmd.Wait returned
	err    error         // cmd.Wait's result, once exited is closed
}

// serveFG starts stargz-mount ref at e.target in the foreground and waits
// until it is mounted. The process is killed at the end of the test.
func (e *env) serveFG(ref string, flags ...string) *server {
	e.t.Helper()
	s := &server{cmd: e.cmd(append(flags, ref, e.target)...), log: filepath.Join(e.t.TempDir(), "server.log"), exited: make(chan struct{})}
	logf, err := os.Create(s.log)
	if err != nil {
		e.t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { s.err = s.cmd.Wait(); logf.Close(); close(s.exited) }()
	e.t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.exited
		if e.t.Failed() {
			b, _ := os.ReadFile(s.log)
			e.t.Logf("log of stargz-mount %s %s:\n%s", ref, e.target, b)
		}
	})
	for range 2400 { // 60 s: the machine may be busy
		if mounted(e.target) {
			return s
		}
		select {
		case <-s.exited:
			b, _ := os.ReadFile(s.log)
			e.t.Fatalf("stargz-mount %s exited: %v\n%s", ref, s.err, b)
		case <-time.After(25 * time.Millisecond):
		}
	}
	b, _ := os.ReadFile(s.log)
	e.t.Fatalf("mount did not come up:\n%s", b)
	return nil
}

// waitExit waits for the server to exit, failing the test if it does not
// within d or exits with an error.
func (s *server) waitExit(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case <-s.exited:
		if s.err != nil {
			b, _ := os.ReadFile(s.log)
			t.Errorf("server exited: %v\n%s", s.err, b)
		}
	case <-time.After(d):
		b, _ := os.ReadFile(s.log)
		t.Fatalf("server still running %s after its unmount:\n%s", d, b)
	}
}

func (s *server) running() bool {
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

// fuseMountsAt counts the FUSE mounts whose mount point is dir.
func fuseMountsAt(t testing.TB, dir string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(f) {
			continue
		}
		if f[4] == dir && strings.HasPrefix(f[sep+1], "fuse") {
			n++
		}
	}
	return n
}

// assertSharedGone checks that the shared layer has no mount and no
// directory left.
func assertSharedGone(t *testing.T, mnt string) {
	t.Helper()
	if n := fuseMountsAt(t, mnt); n != 0 {
		t.Errorf("%d FUSE mounts left at %s", n, mnt)
	}
	if _, err := os.Stat(filepath.Dir(mnt)); !os.IsNotExist(err) {
		ents, _ := os.ReadDir(filepath.Dir(mnt))
		t.Errorf("shared layer directory %s left (%v): %d entries", filepath.Dir(mnt), err, len(ents))
	}
}

func dropCaches() { os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) }

func statsOf(t *testing.T, target string) stats.Snapshot {
	t.Helper()
	out, err := exec.Command(binary, "stats", "--json", target).Output()
	if err != nil {
		t.Fatalf("stats %s: %v", target, err)
	}
	var snap stats.Snapshot
	if err := json.Unmarshal(out, &snap); err != nil {
		t.Fatalf("stats output: %v\n%s", err, out)
	}
	return snap
}

// TestSharedLayers: two images mounted at once share the FUSE mount of
// their common layer, across two processes; whichever is unmounted first,
// the shared layer stays for the other (the serving process serves on
// after its own unmount), and once both are unmounted nothing is left.
func TestSharedLayers(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	imgs := buildSharedImages(t, host)
	tests := []struct {
		name        string
		serverFirst bool // unmount A, which serves the shared layer, first
	}{
		{name: "server unmounted first", serverFirst: true},
		{name: "borrower unmounted first"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b, mnt := imgs.pair(t)
			sa := a.serveFG(imgs.refA)
			sb := b.serveFG(imgs.refB)

			if n := fuseMountsAt(t, mnt); n != 1 {
				t.Fatalf("%d FUSE mounts of the shared layer at %s, want 1", n, mnt)
			}
			// Four lowers in two stacks, three FUSE mounts: A's own, B's
			// own and the shared one.
			links, _ := filepath.Glob(filepath.Join(a.cache, "m", "*", "[0-9]"))
			layerMounts := map[string]bool{}
			for _, l := range links {
				if d, err := os.Readlink(l); err == nil && fuseMountsAt(t, d) == 1 {
					layerMounts[d] = true
				}
			}
			if len(links) != 4 || len(layerMounts) != 3 || !layerMounts[mnt] {
				t.Errorf("lowers %q use FUSE mounts %v; want 4 lowers on 3 mounts, one %s", links, layerMounts, mnt)
			}
			checkFiles(t, a.target, imgs.want(false))
			checkFiles(t, b.target, imgs.want(true))
			for name := range imgs.wantShared {
				if name == "shared/f0" {
					continue // B's layer replaces it
				}
				ba, _ := os.ReadFile(filepath.Join(a.target, name))
				bb, _ := os.ReadFile(filepath.Join(b.target, name))
				if !bytes.Equal(ba, bb) {
					t.Errorf("%s differs between the two mounts", name)
				}
			}

			// B borrows the shared layer from A; each serves its own top
			// layer.
			snapB := statsOf(t, b.target)
			if len(snapB.Layers) != 2 || !snapB.Layers[0].Borrowed || snapB.Layers[0].ServerPID != sa.cmd.Process.Pid || snapB.Layers[1].Borrowed {
				t.Errorf("B's stats: %+v; want layer 0 borrowed from pid %d", snapB.Layers, sa.cmd.Process.Pid)
			}
			snapA := statsOf(t, a.target)
			if len(snapA.Layers) != 2 || snapA.Layers[0].Borrowed || snapA.Layers[0].FetchedBytes == 0 {
				t.Errorf("A's stats: %+v; want layer 0 served and fetched", snapA.Layers)
			}
			if out, err := exec.Command(binary, "stats", b.target).CombinedOutput(); err != nil || !strings.Contains(string(out), fmt.Sprintf("served by pid %d", sa.cmd.Process.Pid)) {
				t.Errorf("stats table of B: %v\n%s", err, out)
			}

			first, second := b, a
			sFirst, sSecond := sb, sa
			wantSecond := imgs.want(false)
			if tt.serverFirst {
				first, second, sFirst, sSecond, wantSecond = a, b, sa, sb, imgs.want(true)
			}
			first.umount()
			if mounted(first.target) {
				t.Errorf("%s still mounted after umount", first.target)
			}
			if ents, _ := os.ReadDir(filepath.Join(a.cache, "m")); len(ents) != 1 {
				t.Errorf("%d per-mount state dirs, want the second mount's only", len(ents))
			}
			// The shared layer stays, served by A's process either way.
			if n := fuseMountsAt(t, mnt); n != 1 {
				t.Errorf("%d FUSE mounts of the shared layer while the second mount uses it, want 1", n)
			}
			if tt.serverFirst {
				if !sa.running() {
					t.Errorf("A's server exited while B still uses its shared layer")
				}
				if log := mustRead(t, sa.log); !strings.Contains(log, "still used by another mount; serving until it is released") {
					t.Errorf("A's log does not say it keeps serving:\n%s", log)
				}
			} else {
				sb.waitExit(t, 15*time.Second)
			}
			dropCaches()
			checkFiles(t, second.target, wantSecond)

			second.umount()
			sFirst.waitExit(t, 15*time.Second)
			sSecond.waitExit(t, 15*time.Second)
			assertSharedGone(t, mnt)
			a.assertClean()
			b.assertClean()
		})
	}
}

// TestSharedLayersConcurrentStart: two processes mounting the same image
// at the same moment end up with one FUSE mount per layer, one serving and
// one borrowing each.
func TestSharedLayersConcurrentStart(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	imgs := buildSharedImages(t, host)
	for round := range 3 {
		a, b, mnt := imgs.pair(t)
		cmds := []*exec.Cmd{a.cmd("--daemon", imgs.refA, a.target), b.cmd("--daemon", imgs.refA, b.target)}
		errs := make(chan error, 2)
		for _, c := range cmds {
			go func() {
				out, err := c.CombinedOutput()
				if err != nil {
					err = fmt.Errorf("%v: %s", err, out)
				}
				errs <- err
			}()
		}
		for range cmds {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if n := fuseMountsAt(t, mnt); n != 1 {
			t.Errorf("round %d: %d FUSE mounts of the shared layer, want 1", round, n)
		}
		sa, sb := statsOf(t, a.target), statsOf(t, b.target)
		for i := range sa.Layers {
			if sa.Layers[i].Borrowed == sb.Layers[i].Borrowed {
				t.Errorf("round %d: layer %d borrowed by A: %v, by B: %v; want exactly one", round, i, sa.Layers[i].Borrowed, sb.Layers[i].Borrowed)
			}
		}
		checkFiles(t, a.target, imgs.want(false))
		checkFiles(t, b.target, imgs.want(false))
		a.umount()
		b.umount()
		// The server may still be unmounting its last layer.
		for range 100 {
			if _, err := os.Stat(filepath.Dir(mnt)); os.IsNotExist(err) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		assertSharedGone(t, mnt)
		a.assertClean()
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestSharedLayerServerKilled: when the process serving a shared layer is
// killed, the other mount's reads of that layer fail, but every unmount
// still works, the last user removes the dead mount, and a new mount of the
// layer replaces it with a live one.
func TestSharedLayerServerKilled(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	imgs := buildSharedImages(t, host)
	tests := []struct {
		name string
		// remount mounts A again (a new server of the shared layer)
		// while B still uses the dead mount.
		remount bool
		// killedFirst unmounts the killed A before B.
		killedFirst bool
	}{
		{name: "user unmounts last", killedFirst: true},
		{name: "user unmounts first"},
		{name: "new mount replaces the dead one", remount: true, killedFirst: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b, mnt := imgs.pair(t)
			sa := a.serveFG(imgs.refA)
			sb := b.serveFG(imgs.refB)
			if snap := statsOf(t, b.target); !snap.Layers[0].Borrowed {
				t.Fatalf("B does not borrow the shared layer: %+v", snap.Layers[0])
			}
			sa.cmd.Process.Signal(syscall.SIGKILL)
			<-sa.exited

			// The dead server's layer fails B's reads of what the kernel
			// does not have cached. (So do lookups of any path not cached:
			// overlayfs looks a path up in every lower.)
			dropCaches()
			if _, err := os.ReadFile(filepath.Join(b.target, "shared/f1")); !errorsIs(err, syscall.ENOTCONN) && !errorsIs(err, syscall.EIO) {
				t.Errorf("read of the killed server's layer: %v, want ENOTCONN or EIO", err)
			}
			// B says so in its log.
			for i := 0; !strings.Contains(mustRead(t, sb.log), "the process serving a shared layer of this mount is gone"); i++ {
				if i == 100 {
					t.Errorf("B's log does not tell that the server of its shared layer died:\n%s", mustRead(t, sb.log))
					break
				}
				time.Sleep(50 * time.Millisecond)
			}

			var sc *server
			c := a.sibling()
			if tt.remount {
				sc = c.serveFG(imgs.refA)
				if n := fuseMountsAt(t, mnt); n != 1 {
					t.Errorf("%d FUSE mounts of the shared layer after the remount, want 1", n)
				}
				checkFiles(t, c.target, imgs.want(false))
				if snap := statsOf(t, c.target); snap.Layers[0].Borrowed {
					t.Errorf("the new mount borrows the dead layer: %+v", snap.Layers[0])
				}
			}
			if sc != nil {
				// C's mount is used by C only: B holds the dead one.
				c.umount()
				sc.waitExit(t, 15*time.Second)
				if n := fuseMountsAt(t, mnt); n != 0 {
					t.Errorf("%d FUSE mounts of the shared layer after C, its only user, went", n)
				}
			}
			if tt.killedFirst {
				a.umount() // the mounts the killed server left
				b.umount()
			} else {
				b.umount()
				a.umount()
			}
			sb.waitExit(t, 15*time.Second)
			assertSharedGone(t, mnt)
			a.assertClean()
			for _, e := range []*env{b, c} {
				if mounted(e.target) {
					t.Errorf("%s still mounted", e.target)
				}
			}
		})
	}
}

// TestShareLayersOff: with --share-layers=false every process mounts its
// own copy of a common layer, as before.
func TestShareLayersOff(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	imgs := buildSharedImages(t, host)
	a := newEnv(t)
	b := a.sibling()
	a.mount(imgs.refA, "--share-layers=false")
	b.mount(imgs.refB, "--share-layers=false")
	if left := leftMounts(a.cache); len(left) != 4 {
		t.Errorf("layer mounts in the state dirs: %q, want 4 private ones", left)
	}
	if n := fuseMountsAt(t, imgs.sharedMnt(t, a.cache)); n != 0 {
		t.Errorf("a shared layer mount without sharing")
	}
	checkFiles(t, a.target, imgs.want(false))
	checkFiles(t, b.target, imgs.want(true))
	if snap := statsOf(t, b.target); snap.Layers[0].Borrowed {
		t.Errorf("borrowed without sharing: %+v", snap.Layers[0])
	}
	a.umount()
	checkFiles(t, b.target, imgs.want(true))
	b.umount()
	a.assertClean()
	b.assertClean()
}

// TestSharedLayerUserKilled: a killed user drops its reference with its
// flock, so the server that serves on for it unmounts the layer and exits
// at once, although the killed process's overlay still holds the layer's
// file system; umount of the killed mount then leaves nothing.
func TestSharedLayerUserKilled(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	imgs := buildSharedImages(t, host)
	a, b, mnt := imgs.pair(t)
	sa := a.serveFG(imgs.refA)
	sb := b.serveFG(imgs.refB)
	checkFiles(t, b.target, imgs.want(true))
	a.umount()
	if !sa.running() {
		t.Fatal("A's server exited while B uses its shared layer")
	}
	sb.cmd.Process.Signal(syscall.SIGKILL)
	<-sb.exited
	start := time.Now()
	sa.waitExit(t, 5*time.Second)
	t.Logf("A's server exited %v after B was killed", time.Since(start).Round(time.Millisecond))
	if n := fuseMountsAt(t, mnt); n != 0 {
		t.Errorf("%d FUSE mounts of the shared layer after its last user died", n)
	}
	b.umount() // the overlay the killed process left
	assertSharedGone(t, mnt)
	a.assertClean()
	b.assertClean()
}
