package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// unprivileged is a user created for a test, removed in t.Cleanup.
type unprivileged struct {
	t        testing.TB
	name     string
	uid, gid uint32
	home     string
}

// workDir makes a directory under /tmp that the user can read, holding a
// copy of the binary under test (which lives in a root-only directory),
// removed at the end; it returns the directory and the copy.
func (u *unprivileged) workDir(prefix string) (work, exe string) {
	u.t.Helper()
	work, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		u.t.Fatal(err)
	}
	u.t.Cleanup(func() { os.RemoveAll(work) })
	os.Chmod(work, 0o755)
	exe = filepath.Join(work, "stargz-mount")
	copyFile(u.t, binary, exe, 0o755)
	return work, exe
}

func newUnprivileged(t testing.TB) *unprivileged {
	t.Helper()
	for _, tool := range []string{"useradd", "userdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian package passwd)", tool)
		}
	}
	var b [3]byte
	rand.Read(b[:])
	name := "sgz" + hex.EncodeToString(b[:])
	if out, err := exec.Command("useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name).CombinedOutput(); err != nil {
		t.Fatalf("useradd: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		// Whatever the user left mounted goes first, then the user.
		u, _ := user.Lookup(name)
		if u != nil {
			for _, m := range leftMounts(u.HomeDir) {
				unix.Unmount(m, unix.MNT_DETACH)
			}
		}
		exec.Command("pkill", "-KILL", "-u", name).Run()
		if out, err := exec.Command("userdel", "--remove", name).CombinedOutput(); err != nil {
			t.Errorf("userdel %s: %v\n%s", name, err, out)
		}
	})
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &unprivileged{t: t, name: name, uid: uint32(uid), gid: uint32(gid), home: u.HomeDir}
}

// in returns u reporting failures to t, for subtests.
func (u *unprivileged) in(t testing.TB) *unprivileged {
	c := *u
	c.t = t
	return &c
}

// command runs name as the user, with a login-like environment and no
// XDG variables, so defaults apply.
func (u *unprivileged) command(name string, args ...string) *exec.Cmd {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	u.t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = time.Second
	cmd.Env = []string{"HOME=" + u.home, "USER=" + u.name, "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C"}
	cmd.Dir = u.home
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u.uid, Gid: u.gid}}
	return cmd
}

func (u *unprivileged) run(name string, args ...string) string {
	u.t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := u.command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		u.t.Fatalf("as %s: %s %q: %v\n%s%s", u.name, name, args, err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// openDevFuse makes /dev/fuse usable by everyone, as Debian's fuse3 package
// leaves it, and restores its mode in t.Cleanup.
func openDevFuse(t testing.TB) {
	t.Helper()
	fi, err := os.Stat("/dev/fuse")
	if err != nil {
		t.Skip("needs /dev/fuse")
	}
	if fi.Mode().Perm()&0o006 == 0o006 {
		return
	}
	if err := os.Chmod("/dev/fuse", 0o666); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod("/dev/fuse", fi.Mode().Perm()) })
}

// TestRootless mounts an image as an unprivileged user: the mount is in the
// user's own mount namespace (their processes and root's see it), layers
// are stacked by fuse-overlayfs with whiteouts and opaque directories
// applied, and state follows XDG defaults in the user's home.
func TestRootless(t *testing.T) {
	needFUSE(t) // root, to create the user
	for _, tool := range []string{"fuse-overlayfs", "pkill"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian package %s)", tool, map[string]string{"fuse-overlayfs": "fuse-overlayfs", "pkill": "procps"}[tool])
		}
	}
	host := lt.InProcessRegistry(t)
	big := lt.Random("rootless-big", 8<<20)
	img, err := lt.BuildImage(256<<10,
		[]lt.Entry{
			lt.Dir("etc"), lt.FileString("etc/motd", "hello rootless\n"),
			lt.FileString("gone", "deleted above"),
			lt.Dir("opq"), lt.FileString("opq/old", "hidden above"),
			lt.File("big", big),
		},
		[]lt.Entry{
			lt.Whiteout("gone"),
			lt.Dir("opq"), lt.Opaque("opq"), lt.FileString("opq/new", "new"),
			lt.FileString("etc/top", "top layer\n"),
		})
	if err != nil {
		t.Fatal(err)
	}
	ref := host + "/rootless:1"
	lt.Push(t, img, ref)

	u := newUnprivileged(t)
	work, exe := u.workDir("sgz-rootless")
	target := filepath.Join(work, "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chown(target, int(u.uid), int(u.gid))
	t.Cleanup(func() {
		if mounted(target) {
			exec.Command(binary, "umount", target).Run()
		}
		if mounted(target) {
			unix.Unmount(target, unix.MNT_DETACH)
		}
	})

	t.Run("clear error without /dev/fuse access", func(t *testing.T) {
		u := u.in(t)
		fi, _ := os.Stat("/dev/fuse")
		if fi.Mode().Perm()&0o006 == 0o006 {
			t.Skip("/dev/fuse is already open to everyone on this machine")
		}
		var stderr bytes.Buffer
		cmd := u.command(exe, "--daemon", ref, target)
		cmd.Stderr = &stderr
		if err := cmd.Run(); err == nil {
			t.Fatal("mount succeeded without /dev/fuse access")
		}
		if msg := stderr.String(); !strings.Contains(msg, "/dev/fuse") || !strings.Contains(msg, "chmod 0666 /dev/fuse") {
			t.Errorf("error does not say what is missing and how to fix it: %s", msg)
		}
		if mounted(target) {
			t.Fatal("target mounted after a failure")
		}
	})

	openDevFuse(t)
	u.run(exe, "--daemon", ref, target)
	if !mounted(target) {
		t.Fatalf("%s is not mounted in the initial mount namespace", target)
	}
	if fs := fsType(target); fs != "fuse.fuse-overlayfs" {
		t.Errorf("mount type %q, want fuse.fuse-overlayfs", fs)
	}
	// The user's own processes see the merged tree.
	if got := u.run("ls", "-A", target); got != "big\netc\nopq\n" {
		t.Errorf("ls as the user: %q", got)
	}
	if got := u.run("ls", target+"/opq"); got != "new\n" {
		t.Errorf("opaque dir shows %q, want only the top layer's", got)
	}
	if got := u.run("cat", target+"/etc/motd", target+"/etc/top"); got != "hello rootless\ntop layer\n" {
		t.Errorf("cat as the user: %q", got)
	}
	sum := u.run("sha256sum", target+"/big")
	if want := fmt.Sprintf("%x", sha256.Sum256(big)); !strings.HasPrefix(sum, want) {
		t.Errorf("big file as the user: %s, want %s", sum, want)
	}
	if err := u.command("touch", target+"/new").Run(); err == nil {
		t.Errorf("a read-only rootless mount took a new file")
	}
	// Everything shows as the user's own (fuse-overlayfs squashes owners).
	if got, want := u.run("stat", "-c", "%u:%g", target+"/etc/motd"), fmt.Sprintf("%d:%d\n", u.uid, u.gid); got != want {
		t.Errorf("owner as the user: %q, want %q", got, want)
	}
	// State and the daemon log follow XDG defaults: ~/.cache/stargz-mount.
	cache := filepath.Join(u.home, ".cache/stargz-mount")
	if _, err := os.Stat(filepath.Join(cache, "stargz-mount.log")); err != nil {
		t.Errorf("no daemon log in the XDG cache dir: %v", err)
	}
	if n := len(leftMounts(cache)); n != 2 {
		t.Errorf("%d layer mounts in %s, want 2", n, cache)
	}

	u.run(exe, "umount", target)
	if mounted(target) {
		t.Errorf("%s still mounted after umount", target)
	}
	if left := leftMounts(u.home); len(left) > 0 {
		t.Errorf("mounts left in the user's home: %q", left)
	}
	if ents, _ := os.ReadDir(filepath.Join(cache, "m")); len(ents) > 0 {
		t.Errorf("per-mount state left: %d entries", len(ents))
	}

	t.Run("--writable", func(t *testing.T) {
		u := u.in(t)
		u.run(exe, "--daemon", "--writable", ref, target)
		u.run("sh", "-c", `echo changed > "$0"/etc/motd && mkdir "$0"/etc/new && rm "$0"/big`, target)
		if got := u.run("cat", target+"/etc/motd"); got != "changed\n" {
			t.Errorf("motd after write: %q", got)
		}
		if got := u.run("ls", target); got != "etc\nopq\n" {
			t.Errorf("ls after rm: %q", got)
		}
		u.run(exe, "umount", target)
		if mounted(target) || len(leftMounts(u.home)) > 0 {
			t.Errorf("mounts left: target %v, home %q", mounted(target), leftMounts(u.home))
		}
	})

	t.Run("plain gzip image", func(t *testing.T) {
		u := u.in(t)
		plain, err := lt.BuildGzipImage([]lt.Entry{
			lt.Dir("etc"), lt.FileString("etc/motd", "plain\n"),
			lt.Dir("root", lt.Mode(0o700)), lt.FileString("root/secret", "s\n", lt.Mode(0o600)),
		})
		if err != nil {
			t.Fatal(err)
		}
		lt.Push(t, plain, host+"/plain:1")
		u.run(exe, "--daemon", host+"/plain:1", target)
		if got := u.run("cat", target+"/etc/motd", target+"/root/secret"); got != "plain\ns\n" {
			t.Errorf("cat as the user: %q", got)
		}
		u.run(exe, "umount", target)
		if mounted(target) || len(leftMounts(u.home)) > 0 {
			t.Errorf("mounts left: target %v, home %q", mounted(target), leftMounts(u.home))
		}
	})

	t.Run("fusermount3 -u from outside stops the server", func(t *testing.T) {
		u := u.in(t)
		var stderr bytes.Buffer
		cmd := u.command(exe, ref, target)
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 400 && !mounted(target); i++ {
			time.Sleep(50 * time.Millisecond)
		}
		if !mounted(target) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("foreground server did not mount:\n%s", stderr.String())
		}
		u.run("fusermount3", "-u", target)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Fatalf("server still running after its overlay was unmounted:\n%s", stderr.String())
		}
		if mounted(target) || len(leftMounts(u.home)) > 0 {
			t.Errorf("mounts left: target %v, home %q", mounted(target), leftMounts(u.home))
		}
	})

	t.Run("umount after the server was killed", func(t *testing.T) {
		u := u.in(t)
		u.run(exe, "--daemon", ref, target)
		u.run("pkill", "-KILL", "-f", "^"+exe+" ")
		u.run(exe, "umount", target)
		if mounted(target) || len(leftMounts(u.home)) > 0 {
			t.Errorf("mounts left: target %v, home %q", mounted(target), leftMounts(u.home))
		}
	})
}

func fsType(dir string) string {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[1] == dir {
			return f[2]
		}
	}
	return ""
}

func copyFile(t testing.TB, from, to string, mode os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkOverlay compares the root stack (kernel overlayfs) with the
// rootless one (fuse-overlayfs) on the Debian image plus a 64 MiB file:
// a metadata walk of the whole tree (find), a cold read of the big file
// (fetched, verified and decompressed on the way) and a warm re-read.
//
//	go test -run XXX -bench Overlay -benchtime 3x .
func BenchmarkOverlay(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root (to create the unprivileged user)")
	}
	for _, tool := range []string{"fuse-overlayfs", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("needs %s", tool)
		}
	}
	big := lt.Random("bench-big", 64<<20)
	img := lt.DebianImage(b, v1.Config{}, []lt.Entry{lt.File("big", big)})
	host := lt.InProcessRegistry(b)
	ref := host + "/debian:bench"
	lt.Push(b, img, ref)
	u := newUnprivileged(b)
	openDevFuse(b)
	work, exe := u.workDir("sgz-bench-overlay")

	for _, mode := range []string{"root-overlayfs", "rootless-fuse-overlayfs"} {
		b.Run(mode, func(b *testing.B) {
			var walk, cold, warm time.Duration
			for i := 0; i < b.N; i++ {
				target := filepath.Join(work, fmt.Sprintf("%s-%d", mode, i))
				os.Mkdir(target, 0o755)
				os.Chown(target, int(u.uid), int(u.gid))
				cmd := func(name string, args ...string) *exec.Cmd { return exec.Command(name, args...) }
				cache := filepath.Join(work, "cache-"+mode)
				if mode != "root-overlayfs" {
					cmd = u.command
					cache = filepath.Join(u.home, ".cache/stargz-mount")
				}
				b.Cleanup(func() {
					if mounted(target) {
						exec.Command(binary, "umount", target).Run()
					}
				})
				timed := func(name string, args ...string) time.Duration {
					start := time.Now()
					if out, err := cmd(name, args...).CombinedOutput(); err != nil {
						b.Fatalf("%s %q: %v\n%s", name, args, err, out)
					}
					return time.Since(start)
				}
				// No background fetch: it would compete with the walk.
				timed(exe, "--cache-dir", cache, "--background-fetch=false", "--daemon", ref, target)
				// Directories of mode 0700 stay closed to the user.
				walk += timed("sh", "-c", `find "$0" -printf '' 2>/dev/null; exit 0`, target)
				cold += timed("sh", "-c", `cat "$0" >/dev/null`, filepath.Join(target, "big"))
				warm += timed("sh", "-c", `cat "$0" >/dev/null`, filepath.Join(target, "big"))
				timed(exe, "umount", target)
			}
			n := time.Duration(b.N)
			b.ReportMetric(float64((walk / n).Milliseconds()), "walk-ms")
			b.ReportMetric(float64(len(big))/1e6/(cold/n).Seconds(), "cold-MB/s")
			b.ReportMetric(float64(len(big))/1e6/(warm/n).Seconds(), "warm-MB/s")
		})
	}
}
