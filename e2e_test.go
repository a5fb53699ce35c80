package main

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// binary is the stargz-mount command under test, built once by TestMain.
var binary string

func TestMain(m *testing.M) {
	// Everything this run creates lives under one root, so the leftover
	// check below sees only this run's mounts, not those of another run
	// on the same machine.
	root, err := os.MkdirTemp("", "sgz-run")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("TMPDIR", root)
	dir, err := os.MkdirTemp("", "stargz-mount-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "stargz-mount")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build stargz-mount: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	// No test may leave a mount behind, whatever happened to it.
	if left := leftMounts(root); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "mounts left behind: %q\n", left)
		for _, m := range left {
			unix.Unmount(m, unix.MNT_DETACH)
		}
		code = 1
	}
	os.RemoveAll(root)
	os.Exit(code)
}

// leftMounts lists mounts whose target is under dir.
func leftMounts(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mounts")
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		if f[1] == dir || strings.HasPrefix(f[1], dir+"/") {
			out = append(out, f[1])
		}
	}
	return out
}

// needFUSE skips tests that mount unless running as root with /dev/fuse and
// fusermount3, which is how CI runs them.
func needFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount overlayfs (CI runs this as root)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		t.Skip("needs fusermount3 (Debian package fuse3)")
	}
}

// env is one test's cache dir and mount point.
type env struct {
	t      testing.TB
	cache  string
	target string
}

func newEnv(t testing.TB) *env {
	t.Helper()
	// A short cache dir keeps the overlay's lowerdir option short.
	cache, err := os.MkdirTemp("", "sgz")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, cache: cache, target: filepath.Join(t.TempDir(), "mnt")}
	if err := os.Mkdir(e.target, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Tear down whatever a failed test left: the tool first, then a
		// lazy unmount of anything still under our dirs.
		if mounted(e.target) {
			exec.Command(binary, "umount", e.target).Run()
		}
		for _, m := range leftMounts(cache) {
			unix.Unmount(m, unix.MNT_DETACH)
		}
		if mounted(e.target) {
			unix.Unmount(e.target, unix.MNT_DETACH)
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(cache, "stargz-mount.log"))
			t.Logf("stargz-mount.log of the failed test:\n%s", b)
		}
		os.RemoveAll(cache)
	})
	return e
}

func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// cmd returns stargz-mount with the env's cache dir and the given args.
func (e *env) cmd(args ...string) *exec.Cmd {
	return exec.Command(binary, append([]string{"--cache-dir", e.cache}, args...)...)
}

// mount mounts ref at e.target with --daemon and fails the test on error.
func (e *env) mount(ref string, flags ...string) {
	e.t.Helper()
	out, err := e.cmd(append(append(flags, "--daemon"), ref, e.target)...).CombinedOutput()
	if err != nil {
		e.t.Fatalf("stargz-mount %s: %v\n%s", ref, err, out)
	}
}

func (e *env) umount() {
	e.t.Helper()
	if out, err := exec.Command(binary, "umount", e.target).CombinedOutput(); err != nil {
		e.t.Fatalf("stargz-mount umount: %v\n%s", err, out)
	}
}

// assertClean checks that nothing of the env is mounted and no per-mount
// state is left.
func (e *env) assertClean() {
	e.t.Helper()
	if mounted(e.target) {
		e.t.Errorf("%s is still mounted", e.target)
	}
	if left := leftMounts(e.cache); len(left) > 0 {
		e.t.Errorf("layer mounts left: %q", left)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.cache, "m")); len(ents) > 0 {
		e.t.Errorf("per-mount state left in %s: %d entries", e.cache, len(ents))
	}
}

func TestCorpusMatchesUmoci(t *testing.T) {
	needFUSE(t)
	reg := lt.DistributionRegistry(t)
	layers := lt.Corpus()
	img, err := lt.BuildImage(lt.CorpusChunkSize, layers...)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Addr + "/corpus:latest"
	lt.Push(t, img, ref)
	want := lt.UmociRootfs(t, ref)

	e := newEnv(t)
	e.mount(ref)
	if diffs := lt.CompareTrees(want, e.target, lt.FormatFiles...); len(diffs) > 0 {
		t.Errorf("%d differences between umoci's rootfs and the mount:\n%s", len(diffs), strings.Join(diffs, "\n"))
	}
	for _, f := range lt.FormatFiles {
		if _, err := os.Lstat(filepath.Join(e.target, f)); err == nil {
			t.Errorf("format file %s is visible", f)
		}
	}
	// Stable inodes: a second lookup after dropping the dentry cache gives
	// the same numbers.
	st1 := inode(t, filepath.Join(e.target, "etc/hostname"))
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0)
	if st2 := inode(t, filepath.Join(e.target, "etc/hostname")); st1 != st2 {
		t.Errorf("inode changed across lookups: %d then %d", st1, st2)
	}
	e.umount()
	e.assertClean()

	// Each layer alone is a valid image too, so a single-layer mount
	// (which needs a second, empty lower) matches as well.
	single, err := lt.BuildImage(lt.CorpusChunkSize, layers[0])
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, single, reg.Addr+"/single:latest")
	want = lt.UmociRootfs(t, reg.Addr+"/single:latest")
	e.mount(reg.Addr + "/single:latest")
	if diffs := lt.CompareTrees(want, e.target, lt.FormatFiles...); len(diffs) > 0 {
		t.Errorf("single layer: %d differences:\n%s", len(diffs), strings.Join(diffs, "\n"))
	}
	e.umount()
	e.assertClean()
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestWritable(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	img, err := lt.BuildImage(64<<10, []lt.Entry{lt.Dir("etc"), lt.FileString("etc/motd", "hello\n")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/w:1")

	t.Run("read-only by default", func(t *testing.T) {
		e := newEnv(t)
		e.mount(host + "/w:1")
		if err := os.WriteFile(filepath.Join(e.target, "etc/new"), nil, 0o644); !errorsIs(err, syscall.EROFS) {
			t.Errorf("write to read-only mount: %v, want EROFS", err)
		}
		e.umount()
		e.assertClean()
	})
	t.Run("--writable", func(t *testing.T) {
		e := newEnv(t)
		e.mount(host+"/w:1", "--writable")
		if err := os.WriteFile(filepath.Join(e.target, "etc/motd"), []byte("changed\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(filepath.Join(e.target, "etc/motd")); string(b) != "changed\n" {
			t.Errorf("motd = %q", b)
		}
		e.umount()
		e.assertClean()
	})
	t.Run("--upper and --work keep changes", func(t *testing.T) {
		e := newEnv(t)
		dir := t.TempDir()
		upper, work := filepath.Join(dir, "upper"), filepath.Join(dir, "work")
		os.Mkdir(upper, 0o755)
		os.Mkdir(work, 0o755)
		e.mount(host+"/w:1", "--upper", upper, "--work", work)
		if err := os.WriteFile(filepath.Join(e.target, "kept"), []byte("yes"), 0o644); err != nil {
			t.Fatal(err)
		}
		e.umount()
		e.assertClean()
		if b, err := os.ReadFile(filepath.Join(upper, "kept")); err != nil || string(b) != "yes" {
			t.Errorf("upper/kept = %q, %v", b, err)
		}
	})
}

func errorsIs(err error, target syscall.Errno) bool {
	var pe *os.PathError
	if e, ok := err.(*os.PathError); ok {
		pe = e
	}
	return pe != nil && pe.Err == target
}

func TestLifecycle(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	img, err := lt.BuildImage(64<<10, []lt.Entry{lt.Dir("etc"), lt.FileString("etc/motd", "hello\n")})
	if err != nil {
		t.Fatal(err)
	}
	ref := host + "/life:1"
	lt.Push(t, img, ref)

	// waitMounted waits for the foreground server to have mounted.
	waitMounted := func(t *testing.T, e *env, cmd *exec.Cmd) {
		t.Helper()
		for i := 0; i < 200; i++ {
			if b, err := os.ReadFile(filepath.Join(e.target, "etc/motd")); err == nil && string(b) == "hello\n" {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("mount did not become ready")
	}
	start := func(t *testing.T, e *env) (*exec.Cmd, *bytes.Buffer) {
		var stderr bytes.Buffer
		cmd := e.cmd(ref, e.target)
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		waitMounted(t, e, cmd)
		return cmd, &stderr
	}
	waitExit := func(t *testing.T, cmd *exec.Cmd, stderr *bytes.Buffer) {
		t.Helper()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server exited with %v\n%s", err, stderr)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("server did not exit\n%s", stderr)
		}
	}
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run("foreground until "+sig.String(), func(t *testing.T) {
			e := newEnv(t)
			cmd, stderr := start(t, e)
			cmd.Process.Signal(sig)
			waitExit(t, cmd, stderr)
			e.assertClean()
		})
	}
	t.Run("foreground until umount", func(t *testing.T) {
		e := newEnv(t)
		cmd, stderr := start(t, e)
		e.umount()
		waitExit(t, cmd, stderr)
		e.assertClean()
	})
	t.Run("umount after SIGKILL", func(t *testing.T) {
		e := newEnv(t)
		cmd, _ := start(t, e)
		cmd.Process.Kill()
		cmd.Wait()
		if _, err := os.ReadDir(e.target); err == nil {
			t.Log("mount still answers after SIGKILL (kernel cache)")
		}
		e.umount()
		e.assertClean()
	})
	t.Run("daemon", func(t *testing.T) {
		e := newEnv(t)
		e.mount(ref)
		if b, err := os.ReadFile(filepath.Join(e.target, "etc/motd")); err != nil || string(b) != "hello\n" {
			t.Fatalf("read after --daemon returned: %q, %v", b, err)
		}
		e.umount()
		e.assertClean()
		log, err := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
		if err != nil || !strings.Contains(string(log), "msg=mounted") || !strings.Contains(string(log), "msg=unmounted") {
			t.Errorf("daemon log: %v\n%s", err, log)
		}
	})
}

func TestMountErrors(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	img, err := lt.BuildImage(64<<10, []lt.Entry{lt.FileString("f", "x")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/ok:1")
	plain, err := lt.BuildGzipImage([]lt.Entry{lt.FileString("f", "x")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, plain, host+"/plain:1")
	// An eStargz layer whose manifest lacks the TOC digest annotation.
	b, err := lt.Estargz(lt.Tar(lt.FileString("f", "x")))
	if err != nil {
		t.Fatal(err)
	}
	b.TOCDigest = ""
	bare, err := lt.Image(b)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, bare, host+"/bare:1")
	dead := lt.ClosedAddr(t)
	denied := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
	}))
	t.Cleanup(denied.Close)
	deniedHost := strings.TrimPrefix(denied.URL, "http://")

	tests := []struct {
		name   string
		args   func(e *env) []string
		want   string // in the one-line error
		exitOK bool
	}{
		{"missing mountpoint", func(e *env) []string { return []string{host + "/ok:1", e.target + "/nope"} }, "does not exist", false},
		{"non-empty mountpoint", func(e *env) []string {
			os.WriteFile(filepath.Join(e.target, "x"), nil, 0o644)
			return []string{host + "/ok:1", e.target}
		}, "not empty", false},
		{"malformed ref", func(e *env) []string { return []string{"Bad::Ref", e.target} }, "invalid image reference", false},
		{"image does not exist", func(e *env) []string { return []string{host + "/nope:1", e.target} }, "not found", false},
		{"tag does not exist", func(e *env) []string { return []string{host + "/ok:2", e.target} }, "not found", false},
		{"unreachable registry", func(e *env) []string { return []string{dead + "/ok:1", e.target} }, "unreachable", false},
		{"denied pull", func(e *env) []string { return []string{deniedHost + "/ok:1", e.target} }, "access denied", false},
		{"bad size flag", func(e *env) []string { return []string{"--cache-max-memory", "lots", host + "/ok:1", e.target} }, "--cache-max-memory", false},
		{"flag after arguments", func(e *env) []string { return []string{host + "/ok:1", e.target, "--daemon"} }, "put flags before", false},
		{"bad platform", func(e *env) []string { return []string{"--platform", "linux", host + "/ok:1", e.target} }, "--platform", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			for _, daemon := range []bool{false, true} {
				args := tt.args(e)
				if daemon {
					args = append([]string{"--daemon"}, args...)
				}
				var stdout, stderr bytes.Buffer
				cmd := e.cmd(args...)
				cmd.Stdout, cmd.Stderr = &stdout, &stderr
				err := cmd.Run()
				if err == nil {
					t.Fatalf("stargz-mount %q succeeded", args)
				}
				msg := strings.TrimSpace(stderr.String())
				if strings.Count(msg, "\n") > 0 || !strings.HasPrefix(msg, "stargz-mount: ") || !strings.Contains(msg, tt.want) {
					t.Errorf("daemon=%v: error output %q, want one line mentioning %q", daemon, msg, tt.want)
				}
				e.assertClean()
			}
		})
	}

	t.Run("--insecure-skip-verify mounts a layer without annotation", func(t *testing.T) {
		e := newEnv(t)
		e.mount(host+"/bare:1", "--insecure-skip-verify")
		if b, err := os.ReadFile(filepath.Join(e.target, "f")); err != nil || string(b) != "x" {
			t.Errorf("f = %q, %v", b, err)
		}
		e.umount()
		e.assertClean()
	})
}

// TestConcurrentReaders reads every file of a 200 MiB layer from 16
// goroutines in different orders and checks every byte.
func TestConcurrentReaders(t *testing.T) {
	needFUSE(t)
	if testing.Short() {
		t.Skip("200 MiB layer; skipped with -short")
	}
	host := lt.InProcessRegistry(t)
	big := lt.BigFileContent(160 << 20)
	entries := lt.BigFileLayer(0)[:1] // the "big" directory
	entries = append(entries, lt.File(lt.BigFileName, big))
	files := map[string][]byte{lt.BigFileName: big}
	for i := range 40 {
		name := fmt.Sprintf("big/f%02d", i)
		data := lt.Random(name, 1<<20+i*7919)
		files[name] = data
		entries = append(entries, lt.File(name, data))
	}
	img, err := lt.BuildImage(1<<20, entries)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/big:1")
	want := map[string][32]byte{}
	var names []string
	for n, d := range files {
		want[n] = sha256.Sum256(d)
		names = append(names, n)
	}

	e := newEnv(t)
	e.mount(host+"/big:1", "--cache-max-memory", "32MiB")
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			order := append([]string(nil), names...)
			r := rand.New(rand.NewPCG(uint64(g), 7))
			r.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			for _, n := range order {
				f, err := os.Open(filepath.Join(e.target, n))
				if err != nil {
					t.Error(err)
					return
				}
				h := sha256.New()
				_, err = io.Copy(h, f)
				f.Close()
				if err != nil {
					t.Errorf("read %s: %v", n, err)
					return
				}
				if got := [32]byte(h.Sum(nil)); got != want[n] {
					t.Errorf("goroutine %d: %s has wrong bytes", g, n)
				}
			}
		}()
	}
	wg.Wait()
	e.umount()
	e.assertClean()
}

// TestTamperedChunk flips one byte inside a chunk of a blob stored by the
// real registry: reads of exactly that file fail with EIO, everything else
// reads correctly, and the mount stays up.
func TestTamperedChunk(t *testing.T) {
	needFUSE(t)
	reg := lt.DistributionRegistry(t)
	victim := lt.Random("victim", 512<<10)
	b, err := lt.Estargz(lt.Tar(lt.File("victim", victim), lt.FileString("bystander", "fine\n")),
		estargz.WithChunkSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	img, err := lt.Image(b)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Addr + "/tamper:1"
	lt.Push(t, img, ref)
	path := reg.BlobPath(b.Digest.String())
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The victim's data starts after the first tar header; a byte a few
	// KiB into the blob lies in its first chunk's gzip stream.
	const flipped = 8 << 10
	data[flipped] ^= 0xff
	// The victim's chunk holding the flipped byte: its bytes of the file
	// and of the blob.
	er, err := estargz.Open(io.NewSectionReader(bytes.NewReader(b.Data), 0, int64(len(b.Data))))
	if err != nil {
		t.Fatal(err)
	}
	var bad *estargz.TOCEntry
	for off := int64(0); off < int64(len(victim)); {
		c, ok := er.ChunkEntryForOffset("victim", off)
		if !ok {
			t.Fatalf("victim has no chunk at %d", off)
		}
		if c.Offset <= flipped && flipped < c.NextOffset() {
			bad = c
		}
		off = c.ChunkOffset + c.ChunkSize
	}
	if bad == nil {
		t.Fatalf("blob byte %d is in no chunk of victim", flipped)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}

	e := newEnv(t)
	e.mount(ref)
	if _, err := os.ReadFile(filepath.Join(e.target, "victim")); !errorsIs(err, syscall.EIO) {
		t.Errorf("read of tampered file: %v, want EIO", err)
	}
	if got, err := os.ReadFile(filepath.Join(e.target, "bystander")); err != nil || string(got) != "fine\n" {
		t.Errorf("bystander = %q, %v", got, err)
	}
	if _, err := os.Stat(filepath.Join(e.target, "victim")); err != nil {
		t.Errorf("stat after failed read: %v", err)
	}
	e.umount()
	e.assertClean()
	// Each failed read is logged with layer, file, the read's offset and
	// size (which cover the bad chunk) and the chunk's blob offset.
	log, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
	failed := regexp.MustCompile(`msg="read failed" layer=(\S+) path=(\S+) offset=(\d+) size=(\d+) err=.*chunk at blob offset (\d+) `)
	n := 0
	for _, line := range strings.Split(string(log), "\n") {
		m := failed.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		n++
		off, _ := strconv.ParseInt(m[3], 10, 64)
		size, _ := strconv.ParseInt(m[4], 10, 64)
		blobOff, _ := strconv.ParseInt(m[5], 10, 64)
		if m[1] != b.Digest.String() || m[2] != "/victim" || blobOff != bad.Offset ||
			off >= bad.ChunkOffset+bad.ChunkSize || off+size <= bad.ChunkOffset {
			t.Errorf("log line %q: want layer %s, path /victim, a read overlapping bytes %d-%d, blob offset %d",
				line, b.Digest, bad.ChunkOffset, bad.ChunkOffset+bad.ChunkSize-1, bad.Offset)
		}
	}
	if n == 0 {
		t.Errorf("log names no failed read with layer, file and offset:\n%s", log)
	}

	// Alter the TOC instead (a byte in the middle of the TOC region, which
	// sits between the data and the 51-byte footer): the mount is refused.
	data[flipped] ^= 0xff // restore the chunk
	tocOff := len(b.Data) - 51 - 200
	data[tocOff] ^= 0x01
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	// Without the disk cache: it holds the TOC from the first mount, which
	// still matches the manifest and would be used.
	out, err := e.cmd("--daemon", "--cache-max-disk", "0", ref, e.target).CombinedOutput()
	if err == nil {
		t.Fatalf("mount with an altered TOC succeeded")
	}
	t.Logf("altered TOC: %s", out)
	if !strings.Contains(string(out), "layer 0") || !strings.Contains(string(out), "does not match") {
		t.Errorf("error does not name the layer: %s", out)
	}
	e.assertClean()
}
