package main

import (
	"compress/gzip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// dropPageCache empties the kernel's page cache (root only).
func dropPageCache(tb testing.TB) {
	tb.Helper()
	exec.Command("sync").Run()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0); err != nil {
		tb.Fatalf("drop page cache: %v", err)
	}
}

// catSeconds times `cat path > /dev/null`.
func catSeconds(tb testing.TB, path string) float64 {
	tb.Helper()
	start := time.Now()
	if out, err := exec.Command("sh", "-c", `cat "$1" > /dev/null`, "sh", path).CombinedOutput(); err != nil {
		tb.Fatalf("cat %s: %v: %s", path, err, out)
	}
	return time.Since(start).Seconds()
}

// BenchmarkWarmDiskRead compares `cat` of a 256 MiB file served from the
// disk cache (fresh mount, so the memory cache is empty; page cache
// dropped) with `cat` of the same bytes from a local file (page cache
// dropped too), and reports both rates and their ratio: with the defaults
// (the kernel reads the file's saved copy itself, FUSE passthrough, where
// the kernel has it) and with --passthrough=false (every read through the
// server, from the chunk files).
//
//	go test -run XXX -bench WarmDiskRead -benchtime 3x .
func BenchmarkWarmDiskRead(b *testing.B) {
	needFUSE(b)
	const size = 256 << 20
	host := lt.InProcessRegistry(b)
	data := lt.BigFileContent(size)
	blob, err := lt.Estargz(lt.Tar(lt.Dir("big"), lt.File(lt.BigFileName, data)), estargz.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		b.Fatal(err)
	}
	img, err := lt.Image(blob)
	if err != nil {
		b.Fatal(err)
	}
	lt.Push(b, img, host+"/warm:1")
	local := filepath.Join(b.TempDir(), "local")
	if err := os.WriteFile(local, data, 0o644); err != nil {
		b.Fatal(err)
	}
	for _, mode := range []struct {
		name  string
		flags []string
	}{
		{"defaults", nil},
		{"passthrough=false", []string{"--passthrough=false"}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			e := newEnv(b)
			e.mount(host+"/warm:1", mode.flags...)
			catSeconds(b, filepath.Join(e.target, lt.BigFileName)) // fills the disk cache
			e.umount()

			var fuseSec, catSec float64
			b.ResetTimer()
			for b.Loop() {
				e.mount(host+"/warm:1", mode.flags...)
				dropPageCache(b)
				fuseSec += catSeconds(b, filepath.Join(e.target, lt.BigFileName))
				e.umount()
				dropPageCache(b)
				catSec += catSeconds(b, local)
			}
			b.StopTimer()
			n := float64(b.N)
			mount, local2 := size/(fuseSec/n)/1e6, size/(catSec/n)/1e6
			b.ReportMetric(mount, "MB/s-disk-cache")
			b.ReportMetric(local2, "MB/s-local-cat")
			b.ReportMetric(mount/local2, "ratio")
			b.Logf("warm read from the disk cache: %.0f MB/s; cat of a local file: %.0f MB/s; ratio %.2f", mount, local2, mount/local2)
		})
	}
}
