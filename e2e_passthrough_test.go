package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// needPassthrough skips on kernels without FUSE passthrough (Linux 6.9+).
func needPassthrough(t *testing.T) {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	rel := unix.ByteSliceToString(u.Release[:])
	f := strings.FieldsFunc(rel, func(r rune) bool { return r < '0' || r > '9' })
	if len(f) >= 2 {
		major, _ := strconv.Atoi(f[0])
		minor, _ := strconv.Atoi(f[1])
		if major > 6 || major == 6 && minor >= 9 {
			return
		}
	}
	t.Skipf("kernel %s has no FUSE passthrough (Linux 6.9 and later)", rel)
}

// waitSaved waits until the mount's stats count n files saved whole.
func (e *env) waitSaved(n int64) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var saved int64
		for _, l := range e.stats().Layers {
			saved += l.FilesSaved
		}
		if saved >= n {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%d files saved after 30 s, want %d", saved, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *env) passthroughOpens() int64 {
	e.t.Helper()
	var n int64
	for _, l := range e.stats().Layers {
		n += l.PassthroughOpens
	}
	return n
}

// readStopped opens name while the server runs, stops the server and reads
// the file whole: only the kernel can serve that read.
func readStopped(t *testing.T, cmd interface{ Signal(os.Signal) error }, path string, want []byte) {
	t.Helper()
	f, err := os.Open(path) // the open itself asks the server
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd.Signal(syscall.SIGSTOP)
	defer cmd.Signal(syscall.SIGCONT)
	done := make(chan error, 1)
	var got []byte
	go func() {
		var err error
		got, err = io.ReadAll(f)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: wrong bytes from the saved copy", path)
		}
	case <-time.After(10 * time.Second):
		cmd.Signal(syscall.SIGCONT)
		<-done
		t.Fatal("a read of a saved file reached the stopped server: no passthrough")
	}
}

// TestPassthrough: a file read whole is saved in the disk cache; later
// opens, in this server and after a restart, hand the copy to the kernel,
// which reads it without the server (stopped meanwhile), through the
// overlay, also to execute a program (mmap); a spoilt copy is dropped and the file is served and saved
// again; --passthrough=false reads through the server.
func TestPassthrough(t *testing.T) {
	needFUSE(t)
	needPassthrough(t)
	host := lt.InProcessRegistry(t)
	big := lt.Random("passthrough", 6<<20+777)
	exe, err := os.ReadFile(binary) // a static program of some MiB
	if err != nil {
		t.Fatal(err)
	}
	img, err := lt.BuildImage(1<<20, []lt.Entry{lt.Dir("d"), lt.File("d/big", big),
		lt.File("d/exe", exe, lt.Mode(0o755)), lt.FileString("small", "hi\n")})
	if err != nil {
		t.Fatal(err)
	}
	ref := host + "/pt:1"
	lt.Push(t, img, ref)
	e := newEnv(t)
	path := filepath.Join(e.target, "d", "big")

	cmd := e.startServer(ref, "--background-fetch=false")
	e.read("d/big", big) // through the server; its last close saves it
	e.read("d/exe", exe)
	e.waitSaved(2)
	if n := e.passthroughOpens(); n != 0 {
		t.Fatalf("%d passthrough opens before the copy was saved", n)
	}
	readStopped(t, cmd.Process, path, big)
	if n := e.passthroughOpens(); n != 1 {
		t.Errorf("%d passthrough opens, want 1", n)
	}
	e.umount()
	cmd.Wait()

	t.Run("after a restart", func(t *testing.T) {
		e.t = t
		cmd := e.startServer(ref, "--background-fetch=false")
		readStopped(t, cmd.Process, path, big)
		// Opens while another is open share its backing file.
		f1, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		e.read("d/big", big)
		f1.Close()
		if n := e.passthroughOpens(); n != 3 {
			t.Errorf("%d passthrough opens, want 3", n)
		}
		out, err := exec.Command(filepath.Join(e.target, "d", "exe"), "--help").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "stargz-mount") {
			t.Errorf("running a program from its saved copy: %v: %s", err, out)
		}
		if n := e.passthroughOpens(); n != 4 {
			t.Errorf("%d passthrough opens after running the program, want 4", n)
		}
		e.umount()
		cmd.Wait()
	})

	t.Run("spoilt copy", func(t *testing.T) {
		e.t = t
		saved := savedFiles(t, e.cache)
		if len(saved) != 2 {
			t.Fatalf("%d saved files in the cache, want 2: %q", len(saved), saved)
		}
		sort.Slice(saved, func(i, j int) bool { return fileSize(saved[i]) == int64(len(big)) })
		b, err := os.ReadFile(saved[0]) // the big file's
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/3] ^= 0x08
		if err := os.WriteFile(saved[0], b, 0o600); err != nil { // keeps inode and xattr
			t.Fatal(err)
		}
		e.mount(ref, "--background-fetch=false")
		e.read("d/big", big) // the copy is refused, the chunks serve
		if n := e.passthroughOpens(); n != 0 {
			t.Errorf("%d passthrough opens of a spoilt copy", n)
		}
		e.waitSaved(1) // and it is saved again; exe never left
		e.read("d/big", big)
		if n := e.passthroughOpens(); n != 1 {
			t.Errorf("%d passthrough opens after saving again, want 1", n)
		}
		e.umount()
		log, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
		if !strings.Contains(string(log), "dropping corrupt cache entry") {
			t.Errorf("no log line for the spoilt copy:\n%s", log)
		}
	})

	t.Run("passthrough off", func(t *testing.T) {
		e.t = t
		e.mount(ref, "--background-fetch=false", "--passthrough=false")
		e.read("d/big", big)
		e.read("d/big", big)
		s := e.stats()
		for _, l := range s.Layers {
			if l.PassthroughOpens != 0 || l.FilesSaved != 0 {
				t.Errorf("with --passthrough=false: %d files saved, %d passthrough opens", l.FilesSaved, l.PassthroughOpens)
			}
		}
		e.umount()
		e.assertClean()
	})
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return -1
	}
	return fi.Size()
}

// savedFiles lists the whole files saved in the disk cache.
func savedFiles(t *testing.T, cache string) []string {
	t.Helper()
	var out []string
	for _, p := range chunkFiles(t, cache) {
		if strings.HasPrefix(filepath.Base(p), "f") {
			out = append(out, p)
		}
	}
	return out
}
