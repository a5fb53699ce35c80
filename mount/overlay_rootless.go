package mount

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"bazil.org/fuse"
)

// Rootless mounts: kernel overlayfs can be mounted by an unprivileged user
// only inside a user namespace, where no process of the user's own mount
// namespace sees it. Without root the layers are still FUSE mounts (through
// the setuid fusermount3) and fuse-overlayfs, the FUSE overlay rootless
// podman uses, stacks them at the target in the user's own namespace.

// fuseOverlayFS is the fuse-overlayfs file system type as mountinfo shows it.
const fuseOverlayFS = "fuse.fuse-overlayfs"

// Rootless reports whether Mount stacks layers with fuse-overlayfs instead
// of kernel overlayfs: when not running as root.
func Rootless() bool { return os.Geteuid() != 0 }

// OpaqueXattr is the xattr the layers must mark opaque directories with for
// the overlay Mount uses: fuse-overlayfs, running unprivileged, cannot read
// trusted.* xattrs.
func OpaqueXattr() string {
	if Rootless() {
		return "user.overlay.opaque"
	}
	return "trusted.overlay.opaque"
}

// CheckRootless tells what is missing for an unprivileged mount, with the
// fix; nil when running as root.
func CheckRootless() error {
	if !Rootless() {
		return nil
	}
	var missing []string
	if _, err := os.Stat("/dev/fuse"); err != nil {
		missing = append(missing, "/dev/fuse does not exist (load the fuse kernel module: modprobe fuse)")
	} else if f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		missing = append(missing, fmt.Sprintf("/dev/fuse is not accessible to you (%v): it must be mode 0666, as Debian's fuse3 package sets it (as root: chmod 0666 /dev/fuse)", errors.Unwrap(err)))
	} else {
		f.Close()
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		missing = append(missing, "fusermount3 is not installed (Debian package fuse3)")
	}
	if _, err := exec.LookPath("fuse-overlayfs"); err != nil {
		missing = append(missing, "fuse-overlayfs is not installed (Debian package fuse-overlayfs)")
	}
	if len(missing) == 0 {
		return nil
	}
	return fmt.Errorf("cannot mount without root: %s", strings.Join(missing, "; "))
}

// fuseOverlay runs fuse-overlayfs in the foreground with the overlay
// options and waits until target is mounted.
func (m *Mounted) fuseOverlay(target, data string) error {
	if strings.Contains(m.dir, ",") {
		return fmt.Errorf("state directory %s has a comma, which fuse-overlayfs cannot take: use another --cache-dir", m.dir)
	}
	// Every file shows as the caller's own: they could pull the image
	// anyway, so this grants nothing, and it is what lets them read the
	// whole tree, write to a --writable mount, and see the image's files
	// as root-owned from a rootless container's user namespace.
	data += fmt.Sprintf(",squash_to_uid=%d,squash_to_gid=%d", os.Getuid(), os.Getgid())
	cmd := exec.Command("fuse-overlayfs", "-f", "-o", data, target)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start fuse-overlayfs: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(30 * time.Second)
	for {
		if ok, _ := isMountPoint(target); ok {
			m.overlayProc, m.overlayExited = cmd, exited
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("fuse-overlayfs at %s: %v: %s", target, err, strings.TrimSpace(out.String()))
		case <-deadline:
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("fuse-overlayfs at %s: not mounted after 30s: %s", target, strings.TrimSpace(out.String()))
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// stopFuseOverlay waits for fuse-overlayfs to exit after its mount is gone.
func (m *Mounted) stopFuseOverlay() error {
	if m.overlayProc == nil {
		return nil
	}
	defer func() { m.overlayProc = nil }()
	select {
	case <-m.overlayExited:
		return nil
	case <-time.After(10 * time.Second):
		m.overlayProc.Process.Kill()
		<-m.overlayExited
		return errors.New("fuse-overlayfs did not exit after unmount; killed it")
	}
}

// fuseOverlayState finds the state directory of the rootless stack at
// target. mountinfo does not show fuse-overlayfs's options (and it sets its
// own fsname), so it is read from the command line of the fuse-overlayfs
// process serving target, which outlives a killed stargz-mount.
func fuseOverlayState(target string) (string, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return "", err
	}
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		args := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != "fuse-overlayfs" || args[len(args)-1] != target {
			continue
		}
		for i, a := range args[:len(args)-1] {
			if a != "-o" {
				continue
			}
			for _, opt := range strings.Split(args[i+1], ",") {
				if lower, ok := strings.CutPrefix(opt, "lowerdir="); ok {
					first, _, _ := strings.Cut(lower, ":")
					return filepath.Dir(first), nil
				}
			}
		}
	}
	return "", fmt.Errorf("no fuse-overlayfs process serves %s", target)
}

// userUnmount removes a FUSE mount of the caller's with fusermount3. A
// lower of a fuse-overlayfs that is still exiting is busy for a moment, so
// it retries for a few seconds before detaching the mount lazily.
func userUnmount(dir string, logger *slog.Logger) error {
	var err error
	for range 40 {
		if err = fuse.Unmount(dir); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	logger.Warn("mount is busy; detaching it lazily", "path", dir, "err", err)
	if out, lerr := exec.Command("fusermount3", "-u", "-z", dir).CombinedOutput(); lerr != nil {
		return fmt.Errorf("fusermount3 -u -z %s: %v: %s", dir, lerr, strings.TrimSpace(string(out)))
	}
	return nil
}
