package main

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// skipHeavy skips tests that move a gigabyte: with -short, and under the
// race detector (`make test` runs them in a separate, non-race go test).
func skipHeavy(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("moves 1 GiB; skipped with -short")
	}
	if raceOn {
		t.Skip("moves 1 GiB; too slow under -race (make test runs it without)")
	}
}

// bigImage is a 1 GiB image: 4 layers of 16 files of 16 MiB, 1 MiB chunks.
type bigImage struct {
	ref   string
	files map[string][32]byte // path in the rootfs → sha256
	bytes int64
}

func buildBigImage(t *testing.T, host string) *bigImage {
	t.Helper()
	const layers, perLayer, size = 4, 16, 16 << 20
	start := time.Now()
	bi := &bigImage{ref: host + "/big:1", files: map[string][32]byte{}}
	var blobs []*lt.Blob
	for l := range layers {
		dir := fmt.Sprintf("l%d", l)
		entries := []lt.Entry{lt.Dir(dir)}
		for f := range perLayer {
			name := fmt.Sprintf("%s/f%02d", dir, f)
			data := lt.Random(name, size)
			bi.files[name] = sha256.Sum256(data)
			bi.bytes += size
			entries = append(entries, lt.File(name, data))
		}
		b, err := lt.Estargz(lt.Tar(entries...), estargz.WithChunkSize(1<<20), estargz.WithCompressionLevel(gzip.BestSpeed))
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, b)
	}
	img, err := lt.Image(blobs...)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, bi.ref)
	t.Logf("built and pushed a %d MiB image in %v", bi.bytes>>20, time.Since(start).Round(time.Millisecond))
	return bi
}

// readAll reads every file of the image under root with par readers and
// checks its sha256. stop, if closed, ends the reading early without error.
func (bi *bigImage) readAll(t *testing.T, root string, par int, stop <-chan struct{}) {
	t.Helper()
	names := make(chan string, len(bi.files))
	for n := range bi.files {
		names <- n
	}
	close(names)
	var wg sync.WaitGroup
	for range par {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range names {
				select {
				case <-stop:
					return
				default:
				}
				h := sha256.New()
				f, err := os.Open(filepath.Join(root, n))
				if err == nil {
					_, err = io.Copy(h, f)
					f.Close()
				}
				select {
				case <-stop:
					// The server may be gone: an open or read that
					// raced the stop has nothing to say.
					return
				default:
				}
				if err != nil {
					t.Errorf("read %s: %v", n, err)
				} else if [32]byte(h.Sum(nil)) != bi.files[n] {
					t.Errorf("%s: wrong bytes", n)
				}
			}
		}()
	}
	wg.Wait()
}

// startServer runs stargz-mount in the foreground and waits for the mount.
func (e *env) startServer(ref string, flags ...string) *exec.Cmd {
	e.t.Helper()
	cmd := e.cmd(append(flags, ref, e.target)...)
	logf, err := os.Create(filepath.Join(e.t.TempDir(), "server.log"))
	if err != nil {
		e.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })
	for range 2400 { // 60 s: the machine may be busy
		if mounted(e.target) {
			return cmd
		}
		time.Sleep(25 * time.Millisecond)
	}
	b, _ := os.ReadFile(logf.Name())
	e.t.Fatalf("mount did not come up:\n%s", b)
	return nil
}

// peakRSS is a process's peak resident set (VmHWM) in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// chunkDiskBytes sums the blocks of the disk cache's files (entries and
// temp files; not the lock and count files). An entry is written as a temp
// file and hard-linked into place: a file seen under both names while the
// walk runs is one inode, counted once.
func chunkDiskBytes(dir string) int64 {
	var n int64
	seen := map[uint64]bool{}
	filepath.WalkDir(filepath.Join(dir, "chunks"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() || strings.HasPrefix(d.Name(), ".") || filepath.Base(filepath.Dir(p)) == ".locks" {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		n += (fi.Size() + 4095) / 4096 * 4096
		return nil
	})
	return n
}

// watchDisk samples the disk cache's size until stop is called, which
// returns the largest size seen.
func watchDisk(dir string) (stop func() int64) {
	var peak atomic.Int64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			if n := chunkDiskBytes(dir); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() int64 { close(done); <-finished; return peak.Load() }
}

// TestCacheBounds reads a 1 GiB image under the memory bound, under a disk
// bound of a third of it, from two processes sharing one cache dir, and
// across a SIGKILL in the middle of caching.
func TestCacheBounds(t *testing.T) {
	needFUSE(t)
	skipHeavy(t)
	host := lt.InProcessRegistry(t)
	bi := buildBigImage(t, host)
	diskBound := bi.bytes / 3

	t.Run("memory 64MiB", func(t *testing.T) {
		const budget = 64 << 20
		e := newEnv(t)
		cmd := e.startServer(bi.ref, "--cache-max-memory", "64MiB", "--cache-max-disk", "0")
		bi.readAll(t, e.target, 4, nil)
		peak := peakRSS(t, cmd.Process.Pid)
		t.Logf("peak RSS reading %d MiB with a 64 MiB budget: %.1f MiB", bi.bytes>>20, float64(peak)/(1<<20))
		if peak > budget+64<<20 {
			t.Errorf("peak RSS %d MiB, over budget + 64 MiB", peak>>20)
		}
		e.umount()
		e.assertClean()
	})

	t.Run("disk a third of the data", func(t *testing.T) {
		e := newEnv(t)
		stop := watchDisk(e.cache)
		e.mount(bi.ref, "--cache-max-disk", strconv.FormatInt(diskBound, 10))
		bi.readAll(t, e.target, 4, nil)
		e.umount()
		peak := stop()
		t.Logf("disk cache peak %d MiB, bound %d MiB", peak>>20, diskBound>>20)
		if peak > diskBound {
			t.Errorf("disk cache reached %d bytes, bound %d", peak, diskBound)
		}
		if peak < diskBound/2 {
			t.Errorf("disk cache only reached %d bytes of %d: is it used?", peak, diskBound)
		}
		e.assertClean()
	})

	t.Run("two processes share a cache dir", func(t *testing.T) {
		a := newEnv(t)
		b := a.sibling()
		stop := watchDisk(a.cache)
		bound := strconv.FormatInt(diskBound, 10)
		// Private layer mounts: both processes fetch and write the
		// chunk store (shared ones would leave it to one).
		a.mount(bi.ref, "--cache-max-disk", bound, "--share-layers=false")
		b.mount(bi.ref, "--cache-max-disk", bound, "--share-layers=false")
		var wg sync.WaitGroup
		for _, e := range []*env{a, b} {
			wg.Add(1)
			go func() { defer wg.Done(); bi.readAll(t, e.target, 3, nil) }()
		}
		wg.Wait()
		a.umount()
		b.umount()
		peak := stop()
		t.Logf("disk cache peak %d MiB with two processes, bound %d MiB", peak>>20, diskBound>>20)
		if peak > diskBound {
			t.Errorf("disk cache reached %d bytes, bound %d", peak, diskBound)
		}
		assertCount(t, a.cache)
		a.assertClean()
	})

	t.Run("SIGKILL while caching", func(t *testing.T) {
		e := newEnv(t)
		cmd := e.startServer(bi.ref, "--cache-max-disk", "2GiB")
		stopReads := make(chan struct{})
		done := make(chan struct{})
		go func() { defer close(done); bi.readAll(t, e.target, 4, stopReads) }()
		for chunkDiskBytes(e.cache) < 200<<20 {
			time.Sleep(10 * time.Millisecond)
		}
		close(stopReads)
		cmd.Process.Kill()
		cmd.Wait()
		<-done
		e.umount() // the mounts the killed server left
		e.assertClean()
		cached := chunkDiskBytes(e.cache)
		e.mount(bi.ref, "--cache-max-disk", "2GiB")
		bi.readAll(t, e.target, 4, nil)
		e.umount()
		e.assertClean()
		t.Logf("%d MiB cached at the kill, %d MiB after rereading", cached>>20, chunkDiskBytes(e.cache)>>20)
		assertCount(t, e.cache)
		if ents, _ := os.ReadDir(filepath.Join(e.cache, "chunks", ".tmp")); len(ents) > 0 {
			t.Errorf("%d temp files left", len(ents))
		}
	})
}

// assertCount checks that the shared count (`cache du`) matches the files.
func assertCount(t *testing.T, cache string) {
	t.Helper()
	out, err := exec.Command(binary, "cache", "du", "--cache-dir", cache).Output()
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Split(string(out), "\t")
	if len(f) < 2 {
		t.Fatalf("cache du: %q", out)
	}
	n, _ := strconv.ParseInt(strings.TrimSuffix(f[1], " bytes"), 10, 64)
	if disk := chunkDiskBytes(cache); n != disk {
		t.Errorf("cache du says %d bytes, files hold %d", n, disk)
	}
}

// TestHugeTOCMemory mounts a layer whose TOC has 200 000 entries with a
// 64 MiB memory budget: the server's peak RSS, TOC parsing included,
// stays within budget + 64 MiB.
func TestHugeTOCMemory(t *testing.T) {
	needFUSE(t)
	skipHeavy(t)
	const files = 200_000
	host := lt.InProcessRegistry(t)
	start := time.Now()
	// estargz.Build takes about 2 ms per file; write the TOC by hand: 200
	// directories, empty files, and three files with data.
	var data bytes.Buffer
	data.Write(make([]byte, 10))
	entries := make([]*estargz.TOCEntry, 0, files+200)
	for d := range 200 {
		entries = append(entries, &estargz.TOCEntry{Name: fmt.Sprintf("d%03d/", d), Type: "dir", Mode: 0o755})
	}
	withData := map[int]bool{0: true, 99_999: true, files - 1: true}
	for i := range files {
		e := &estargz.TOCEntry{Name: fmt.Sprintf("d%03d/file-%06d", i%200, i), Type: "reg", Mode: 0o644}
		if withData[i] {
			content := strconv.Itoa(i)
			e.Offset, e.Size, e.ChunkSize = int64(data.Len()), int64(len(content)), int64(len(content))
			e.ChunkDigest = digest.FromString(content).String()
			zw := gzip.NewWriter(&data)
			io.WriteString(zw, content)
			zw.Close()
		}
		entries = append(entries, e)
	}
	tocDigest, err := estargz.NewGzipCompressorWithLevel(1).WriteTOCAndFooter(&data, int64(data.Len()),
		&estargz.JTOC{Version: 1, Entries: entries}, sha256.New())
	if err != nil {
		t.Fatal(err)
	}
	blobDigest, _, _ := v1.SHA256(bytes.NewReader(data.Bytes()))
	img, err := lt.Image(&lt.Blob{Data: data.Bytes(), Digest: blobDigest, DiffID: blobDigest, TOCDigest: tocDigest.String()})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/toc:1")
	t.Logf("built a %d-entry layer (TOC of %d KiB) in %v", len(entries), data.Len()>>10, time.Since(start).Round(time.Millisecond))

	e := newEnv(t)
	cmd := e.startServer(host+"/toc:1", "--cache-max-memory", "64MiB")
	afterMount := peakRSS(t, cmd.Process.Pid)
	for _, i := range []int{0, 99_999, files - 1} {
		name := fmt.Sprintf("d%03d/file-%06d", i%200, i)
		if b, err := os.ReadFile(filepath.Join(e.target, name)); err != nil || string(b) != strconv.Itoa(i) {
			t.Errorf("%s = %q, %v", name, b, err)
		}
	}
	rss := currentRSS(t, cmd.Process.Pid)
	t.Logf("%d entries, 64 MiB budget: peak RSS %.1f MiB (during TOC parse), RSS after mount %.1f MiB",
		len(entries), float64(afterMount)/(1<<20), float64(rss)/(1<<20))
	if afterMount > 128<<20 || rss > 128<<20 {
		t.Errorf("peak RSS %d MiB, RSS after mount %d MiB: over budget + 64 MiB", afterMount>>20, rss>>20)
	}
	e.umount()
	e.assertClean()
}

// currentRSS is a process's resident set (VmRSS) in bytes.
func currentRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// unpackedDiskBytes sums the disk blocks of the unpacked layers in the
// cache dir, layers being unpacked included (as the unpack store counts
// them: hard links once; not its lock, hold and size files).
func unpackedDiskBytes(cache string) int64 {
	var n int64
	seen := map[uint64]bool{}
	top := filepath.Join(cache, "layers", "sha256")
	filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == top {
			return nil
		}
		if filepath.Dir(p) == top && !d.IsDir() {
			return nil // HEX.lock, HEX.hold, HEX.size
		}
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) != nil {
			return nil
		}
		if st.Nlink > 1 && st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		n += st.Blocks * 512
		return nil
	})
	return n
}

// TestDiskBoundWithUnpackedLayers: the chunks and the unpacked layers of
// a mount together stay within --cache-max-disk: chunks are evicted to
// make room for the unpacked layer, which the mount holds.
func TestDiskBoundWithUnpackedLayers(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	plain := []lt.Entry{lt.File("plain", lt.Random("plain", 3<<20))}
	want, lazy := files(16, 512<<10)
	img, err := lt.BuildImageAs(64<<10, []lt.Format{lt.FormatGzip, lt.FormatEStargz}, plain, lazy)
	if err != nil {
		t.Fatal(err)
	}
	ref := host + "/bound-unpacked:1"
	lt.Push(t, img, ref)
	const bound = 6 << 20
	e := newEnv(t)
	var peak, peakChunks atomic.Int64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			c := chunkDiskBytes(e.cache)
			if n := c + unpackedDiskBytes(e.cache); n > peak.Load() {
				peak.Store(n)
			}
			if c > peakChunks.Load() {
				peakChunks.Store(c)
			}
			select {
			case <-done:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	e.mount(ref, "--cache-max-disk", strconv.Itoa(bound), "--cache-max-memory", "4MiB", "--prefetch=false")
	checkFiles(t, e.target, want)
	// Let the background fetch and the deferred disk writes finish.
	time.Sleep(2 * time.Second)
	checkFiles(t, e.target, want)
	e.umount()
	close(done)
	<-finished
	unpacked := unpackedDiskBytes(e.cache)
	t.Logf("peak %d KiB of chunks and unpacked layers (%d KiB unpacked, chunks peak %d KiB), bound %d KiB", peak.Load()>>10, unpacked>>10, peakChunks.Load()>>10, bound>>10)
	if unpacked < 3<<20 {
		t.Fatalf("the plain layer takes %d bytes unpacked: not unpacked?", unpacked)
	}
	if peakChunks.Load() < 1<<20 {
		t.Errorf("chunks reached only %d bytes: is the disk cache used?", peakChunks.Load())
	}
	if peak.Load() > bound {
		t.Errorf("chunks and unpacked layers reached %d bytes, bound %d", peak.Load(), bound)
	}
	e.assertClean()
}
