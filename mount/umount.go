package mount

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// unmount removes the mount at dir; if it is busy it is detached lazily.
func unmount(dir string, logger *slog.Logger) error {
	mounted, err := isMountPoint(dir)
	if err != nil || !mounted {
		return nil
	}
	err = unix.Unmount(dir, 0)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EPERM) {
		// Not root: FUSE mounts are the user's to remove via fusermount3.
		if ferr := userUnmount(dir, logger); ferr == nil {
			return nil
		}
	}
	if errors.Is(err, unix.EBUSY) {
		logger.Warn("mount is busy; detaching it lazily", "path", dir)
		if err := unix.Unmount(dir, unix.MNT_DETACH); err == nil {
			return nil
		}
	}
	return fmt.Errorf("unmount %s: %w", dir, err)
}

// mountInfo is one line of /proc/self/mountinfo that matters here.
type mountInfo struct {
	target string
	dev    string // maj:min of the mounted file system
	fstype string
	super  string // super block options
}

func mounts() ([]mountInfo, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountInfo
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent maj:min root target opts [optional...] - fstype source super
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+3 >= len(fields) {
			continue
		}
		out = append(out, mountInfo{
			target: unescape(fields[4]),
			dev:    fields[2],
			fstype: fields[sep+1],
			super:  fields[sep+3],
		})
	}
	return out, sc.Err()
}

// unescape undoes mountinfo's octal escapes (\040 for space and so on).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isMountPoint(dir string) (bool, error) {
	_, ok, err := mountAt(dir)
	return ok, err
}

// mountAt returns the topmost mount at dir.
func mountAt(dir string) (mountInfo, bool, error) {
	ms, err := mounts()
	if err != nil {
		return mountInfo{}, false, err
	}
	var found mountInfo
	ok := false
	for _, m := range ms {
		if m.target == dir {
			found, ok = m, true
		}
	}
	return found, ok, nil
}

// Unmount tears down the stack mounted at target: it asks the serving
// process to stop and, if that process is gone or does not finish in time,
// unmounts the overlay and every layer itself.
//
// It returns once the overlay at target is gone and the serving process
// exited, or tore its mount down and serves on only shared layers another
// mount still uses: such a process unmounts its overlay and its other
// layers, removes the state directory, then serves on in the background
// until those layers are released (see shared.go). Unmount does not wait
// for that.
func Unmount(target string, logger *slog.Logger) error {
	if logger == nil {
		logger = slog.Default()
	}
	abs, err := filepath.Abs(target)
	if err != nil {
		return err
	}
	dir, st, err := findState(abs)
	if err != nil {
		return err
	}
	if st.PID > 0 && st.PID != os.Getpid() && alive(st.PID) {
		if err := syscall.Kill(st.PID, syscall.SIGTERM); err == nil {
			deadline := time.Now().Add(15 * time.Second)
			for time.Now().Before(deadline) && alive(st.PID) && !lingering(st.PID, dir, st.Shared) {
				time.Sleep(50 * time.Millisecond)
			}
			if still, _ := isMountPoint(abs); !still {
				if !alive(st.PID) {
					return nil
				}
				if lingering(st.PID, dir, st.Shared) {
					logger.Info("unmounted; the server goes on serving shared layers other mounts use until they are released", "pid", st.PID)
					return nil
				}
			}
			logger.Warn("server did not stop in time; unmounting directly", "pid", st.PID)
		}
	}
	var errs []error
	if err := unmount(abs, logger); err != nil {
		errs = append(errs, err)
	}
	for i := len(st.Layers) - 1; i >= 0; i-- {
		if err := unmount(st.Layers[i], logger); err != nil {
			errs = append(errs, err)
		}
	}
	// The server's shared layers: if it is dead, its locks died with it;
	// a layer nobody else uses is removed, one still used is left to its
	// users (the last one removes it). The layers of a live server that
	// does not answer stay until it ends.
	for _, d := range st.Shared {
		if err := releaseOrphan(d, logger); err != nil {
			errs = append(errs, fmt.Errorf("release shared layer %s: %w", d, err))
		}
	}
	if len(errs) == 0 && dir != "" {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// lingering reports whether process pid tore its mount down (removed its
// state directory dir) and serves on shared layers others use: it still
// serves one of the mount's shared layers. A server that is merely exiting
// has removed those it served before its state directory.
func lingering(pid int, dir string, shared []string) bool {
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		return false
	}
	for _, d := range shared {
		if serverPID(d) == pid {
			return true
		}
	}
	return false
}

// findState finds the state of the stack at target through the overlay's
// lowerdir option: the layer mount points live in the state directory.
func findState(target string) (string, State, error) {
	ms, err := mounts()
	if err != nil {
		return "", State{}, err
	}
	for _, m := range ms {
		if m.target != target {
			continue
		}
		if m.fstype == fuseOverlayFS {
			// A rootless stack.
			dir, err := fuseOverlayState(target)
			if err != nil {
				return "", State{}, fmt.Errorf("%s is a fuse-overlayfs mount, but not one of stargz-mount's: %w", target, err)
			}
			st, err := readState(dir)
			if err != nil {
				return "", State{}, fmt.Errorf("%s is a fuse-overlayfs mount, but not one of stargz-mount's: %w", target, err)
			}
			return dir, st, nil
		}
		if m.fstype != "overlay" {
			return "", State{}, fmt.Errorf("%s is a %s mount, not one of stargz-mount's", target, m.fstype)
		}
		for _, opt := range strings.Split(m.super, ",") {
			lower, ok := strings.CutPrefix(opt, "lowerdir=")
			if !ok {
				continue
			}
			first, _, _ := strings.Cut(lower, ":")
			dir := filepath.Dir(unescape(first))
			st, err := readState(dir)
			if err != nil {
				return "", State{}, fmt.Errorf("%s is an overlay, but not one of stargz-mount's: %w", target, err)
			}
			return dir, st, nil
		}
	}
	return "", State{}, fmt.Errorf("%s is not mounted", target)
}

func readState(dir string) (State, error) {
	var st State
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("state file %s: %w", filepath.Join(dir, stateFile), err)
	}
	return st, nil
}

// alive reports whether process pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}
