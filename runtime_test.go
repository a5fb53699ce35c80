package main

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// runtimeScript is the image's command in TestRuntimes: who runs it, what a
// setuid-root copy of id says, a device node from a layer, and the Debian
// release.
const runtimeScript = `id -u; /usr/local/bin/suid-id -u; stat -c '%F %t:%T' /devtest/null; cat /etc/debian_version`

// debianRuntimeImage pushes the Debian fixture plus a layer with a
// setuid-root copy of the image's own id and a character device 1:3, with
// user nobody (looked up in the image's /etc/passwd) running runtimeScript.
func debianRuntimeImage(t *testing.T) string {
	t.Helper()
	id := fileFromTar(t, lt.DebianTar(t), "usr/bin/id")
	img := lt.DebianImage(t, v1.Config{
		User:       "nobody",
		Cmd:        []string{"/bin/sh", "-c", runtimeScript},
		WorkingDir: "/tmp",
	}, []lt.Entry{
		lt.Dir("usr"), lt.Dir("usr/local"), lt.Dir("usr/local/bin"),
		lt.File("usr/local/bin/suid-id", id, lt.Mode(0o4755), lt.Owner(0, 0)),
		lt.Dir("devtest"),
		lt.Char("devtest/null", 1, 3, lt.Mode(0o666)),
	})
	reg := lt.DistributionRegistry(t)
	ref := reg.Addr + "/debian:runtime"
	lt.Push(t, img, ref)
	return ref
}

// wantRuntimeOutput checks runtimeScript's output as user nobody.
func wantRuntimeOutput(t *testing.T, out string) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 {
		t.Fatalf("output %q: want 4 lines", out)
	}
	checks := []struct{ what, got, want string }{
		{"uid of the image's user nobody", lines[0], "65534"},
		{"euid of a setuid-root binary", lines[1], "0"},
		{"device node from a layer", lines[2], "character special file 1:3"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: %q, want %q", c.what, c.got, c.want)
		}
	}
	if !strings.HasPrefix(lines[3], "12.") {
		t.Errorf("debian_version %q, want bookworm's 12.x", lines[3])
	}
}

func fileFromTar(t *testing.T, b []byte, name string) []byte {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s not in the tar: %v", name, err)
		}
		if h.Name == name {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			return data
		}
	}
}

// needRuntime skips unless tool is installed, printing why.
func needRuntime(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Skipf("%s is not installed (Debian package %s; make deps installs it)", tool, tool)
	}
	return p
}

func containerID(t *testing.T) string {
	var b [4]byte
	rand.Read(b[:])
	return "sgz-" + strings.ToLower(t.Name()[:3]) + hex.EncodeToString(b[:])
}

// makeBundle runs `stargz-mount bundle --daemon REF DIR` and unmounts it in
// t.Cleanup.
func makeBundle(t *testing.T, e *env, ref string, flags ...string) string {
	t.Helper()
	dir := filepath.Join(filepath.Dir(e.target), "bundle")
	rootfs := filepath.Join(dir, "rootfs")
	t.Cleanup(func() {
		if mounted(rootfs) {
			exec.Command(binary, "umount", rootfs).Run()
		}
		if mounted(rootfs) {
			unix.Unmount(rootfs, unix.MNT_DETACH)
		}
	})
	args := append([]string{"bundle", "--cache-dir", e.cache, "--daemon"}, flags...)
	out, err := exec.Command(binary, append(args, ref, dir)...).CombinedOutput()
	if err != nil {
		t.Fatalf("stargz-mount bundle: %v\n%s", err, out)
	}
	return dir
}

// TestRuntimes checks the config.json `bundle` writes for the Debian image,
// runs the image's command from such a bundle with runc and crun, and from a
// --writable mount with podman run --rootfs.
func TestRuntimes(t *testing.T) {
	needFUSE(t)
	ref := debianRuntimeImage(t)

	t.Run("bundle config.json", func(t *testing.T) {
		e := newEnv(t)
		dir := makeBundle(t, e, ref)
		b, err := os.ReadFile(filepath.Join(dir, "config.json"))
		if err != nil {
			t.Fatal(err)
		}
		var s specs.Spec
		if err := json.Unmarshal(b, &s); err != nil {
			t.Fatal(err)
		}
		if s.Process.User.UID != 65534 || s.Process.User.GID != 65534 || s.Process.Cwd != "/tmp" ||
			s.Process.Terminal || !s.Root.Readonly || s.Root.Path != "rootfs" ||
			strings.Join(s.Process.Args, " ") != "/bin/sh -c "+runtimeScript {
			t.Errorf("config.json process %+v root %+v", s.Process, s.Root)
		}
		if _, err := os.Stat(filepath.Join(dir, "rootfs/etc/debian_version")); err != nil {
			t.Errorf("rootfs not mounted: %v", err)
		}
		if out, err := exec.Command(binary, "umount", filepath.Join(dir, "rootfs")).CombinedOutput(); err != nil {
			t.Fatalf("umount: %v\n%s", err, out)
		}
		e.assertClean()
	})

	t.Run("bundle in the foreground until umount", func(t *testing.T) {
		e := newEnv(t)
		dir := filepath.Join(filepath.Dir(e.target), "fg")
		rootfs := filepath.Join(dir, "rootfs")
		var stderr bytes.Buffer
		cmd := exec.Command(binary, "bundle", "--cache-dir", e.cache, ref, dir)
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			if mounted(rootfs) {
				exec.Command(binary, "umount", rootfs).Run()
			}
		})
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		for i := 0; i < 600; i++ {
			if _, err := os.Stat(filepath.Join(dir, "config.json")); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if !mounted(rootfs) {
			t.Fatalf("no config.json and mount after 30s:\n%s", stderr.String())
		}
		if out, err := exec.Command(binary, "umount", rootfs).CombinedOutput(); err != nil {
			t.Fatalf("umount: %v\n%s", err, out)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("bundle exited with %v\n%s", err, stderr.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("bundle still serving after umount")
		}
		e.assertClean()
	})

	t.Run("runc", func(t *testing.T) {
		runc := needRuntime(t, "runc")
		e := newEnv(t)
		dir := makeBundle(t, e, ref)
		id := containerID(t)
		t.Cleanup(func() { exec.Command(runc, "delete", "-f", id).Run() })
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(runc, "run", "-b", dir, id)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("runc run: %v\n%s%s", err, stdout.String(), stderr.String())
		}
		wantRuntimeOutput(t, stdout.String())
	})

	t.Run("crun", func(t *testing.T) {
		crun := needRuntime(t, "crun")
		e := newEnv(t)
		dir := makeBundle(t, e, ref)
		id := containerID(t)
		t.Cleanup(func() { exec.Command(crun, "delete", "-f", id).Run() })
		// crun takes a cgroup2 mount to mean a unified hierarchy; on a
		// hybrid machine hide it in a private mount namespace of the
		// runtime alone (unshare makes its mounts private).
		script := `set -e
if [ "$(stat -f -c %T /sys/fs/cgroup)" != cgroup2fs ] && mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi
exec "$0" run -b "$1" "$2"`
		var stdout, stderr bytes.Buffer
		cmd := exec.Command("unshare", "--mount", "sh", "-c", script, crun, dir, id)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("crun run: %v\n%s%s", err, stdout.String(), stderr.String())
		}
		wantRuntimeOutput(t, stdout.String())
	})

	t.Run("podman --rootfs", func(t *testing.T) {
		podman := needRuntime(t, "podman")
		needRuntime(t, "runc")
		e := newEnv(t)
		e.mount(ref, "--writable")
		var stdout, stderr bytes.Buffer
		// The ulimits stay within what this machine's hard limits allow;
		// podman's default (raising them to the maximum) fails here.
		cmd := exec.Command(podman, "run", "--rm", "--runtime", "runc", "--network", "none",
			"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
			"--user", "nobody", "--rootfs", e.target, "/bin/sh", "-c", runtimeScript)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("podman run: %v\n%s%s", err, stdout.String(), stderr.String())
		}
		wantRuntimeOutput(t, stdout.String())
		e.umount()
		e.assertClean()
	})

	t.Run("rootless runc", func(t *testing.T) {
		runc := needRuntime(t, "runc")
		if _, err := exec.LookPath("fuse-overlayfs"); err != nil {
			t.Skip("needs fuse-overlayfs (Debian package fuse-overlayfs)")
		}
		u := newUnprivileged(t)
		openDevFuse(t)
		work, exe := u.workDir("sgz-rootless-runc")
		dir := filepath.Join(work, "bundle")
		os.Mkdir(dir, 0o755)
		os.Chown(dir, int(u.uid), int(u.gid))
		rootfs := filepath.Join(dir, "rootfs")
		t.Cleanup(func() {
			if mounted(rootfs) {
				exec.Command(binary, "umount", rootfs).Run()
			}
		})
		u.run(exe, "bundle", "--daemon", ref, dir)
		state := filepath.Join(u.home, "runc")
		id := containerID(t)
		t.Cleanup(func() { u.command(runc, "--root", state, "delete", "-f", id).Run() })
		// In the user namespace the user is root: the image's user
		// nobody is not mapped, so the process runs as (mapped) root.
		out := u.run(runc, "--root", state, "run", "-b", dir, id)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 4 || lines[0] != "0" || lines[2] != "character special file 1:3" || !strings.HasPrefix(lines[3], "12.") {
			t.Errorf("rootless runc output %q", out)
		}
		u.run(exe, "umount", rootfs)
		if mounted(rootfs) {
			t.Errorf("%s still mounted", rootfs)
		}
	})

	t.Run("rootless podman --rootfs", func(t *testing.T) {
		podman := needRuntime(t, "podman")
		needRuntime(t, "runc")
		if _, err := exec.LookPath("fuse-overlayfs"); err != nil {
			t.Skip("needs fuse-overlayfs (Debian package fuse-overlayfs)")
		}
		u := newUnprivileged(t)
		openDevFuse(t)
		work, exe := u.workDir("sgz-rootless-podman")
		target := filepath.Join(work, "mnt")
		os.Mkdir(target, 0o755)
		os.Chown(target, int(u.uid), int(u.gid))
		t.Cleanup(func() {
			if mounted(target) {
				exec.Command(binary, "umount", target).Run()
			}
		})
		u.run(exe, "--daemon", "--writable", ref, target)
		out := u.run(podman, "run", "--rm", "--runtime", "runc", "--network", "none",
			"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
			"--rootfs", target, "/bin/sh", "-c", runtimeScript)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 4 || lines[0] != "0" || lines[2] != "character special file 1:3" || !strings.HasPrefix(lines[3], "12.") {
			t.Errorf("rootless podman output %q", out)
		}
		u.run(exe, "umount", target)
		if mounted(target) {
			t.Errorf("%s still mounted", target)
		}
	})
}

// TestBundleErrors: a bundle that cannot be made says why in one line and
// leaves nothing mounted.
func TestBundleErrors(t *testing.T) {
	out, err := exec.Command(binary, "bundle", "only-a-ref").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "want REF DIR") {
		t.Errorf("bundle with one argument: %v: %s", err, out)
	}

	needFUSE(t)
	host := lt.InProcessRegistry(t)
	b, err := lt.Estargz(lt.Tar(lt.Dir("etc"), lt.FileString("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cfg  v1.Config
		want string
	}{
		{"no entrypoint or cmd", v1.Config{}, "nothing to run"},
		{"unknown user", v1.Config{Cmd: []string{"/bin/true"}, User: "ghost"}, `"ghost"`},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, err := lt.ImageWithConfig(tt.cfg, b)
			if err != nil {
				t.Fatal(err)
			}
			ref := fmt.Sprintf("%s/bad:%d", host, i)
			lt.Push(t, img, ref)
			e := newEnv(t)
			dir := filepath.Join(filepath.Dir(e.target), "bundle")
			for _, daemon := range []bool{false, true} {
				args := []string{"bundle", "--cache-dir", e.cache}
				if daemon {
					args = append(args, "--daemon")
				}
				var stderr bytes.Buffer
				cmd := exec.Command(binary, append(args, ref, dir)...)
				cmd.Stderr = &stderr
				if err := cmd.Run(); err == nil {
					t.Fatalf("daemon=%v: bundle succeeded", daemon)
				}
				msg := strings.TrimSpace(stderr.String())
				if strings.Contains(msg, "\n") || !strings.Contains(msg, tt.want) {
					t.Errorf("daemon=%v: error %q, want one line with %q", daemon, msg, tt.want)
				}
				if mounted(filepath.Join(dir, "rootfs")) {
					t.Fatalf("daemon=%v: rootfs left mounted", daemon)
				}
				if _, err := os.Stat(filepath.Join(dir, "config.json")); err == nil {
					t.Errorf("daemon=%v: config.json written", daemon)
				}
				e.assertClean()
			}
		})
	}
}
