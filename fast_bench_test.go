package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
	"github.com/stargz-mount/stargz-mount/internal/netshape"
	"github.com/stargz-mount/stargz-mount/stats"
)

// Link shaping of the fast-start benchmarks: a registry 30 ms away behind
// 100 MB/s.
const (
	benchDelay     = 30 * time.Millisecond
	benchBandwidth = 100e6
)

func benchSkip(b *testing.B) {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("needs root to mount")
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		b.Skip("needs fusermount3 (Debian package fuse3)")
	}
}

// benchMount mounts ref at a fresh directory with flags and returns it and
// how long the mount took; the mount is removed in b.Cleanup.
func benchMount(b *testing.B, ref string, flags ...string) (string, time.Duration) {
	b.Helper()
	cache, err := os.MkdirTemp("", "sgzb")
	if err != nil {
		b.Fatal(err)
	}
	target := filepath.Join(b.TempDir(), "mnt")
	os.Mkdir(target, 0o755)
	start := time.Now()
	args := append([]string{"--cache-dir", cache, "--daemon", "--quiet"}, flags...)
	out, err := exec.Command(binary, append(args, ref, target)...).CombinedOutput()
	took := time.Since(start)
	b.Cleanup(func() {
		exec.Command(binary, "umount", target).Run()
		for _, m := range leftMounts(cache) {
			unix.Unmount(m, unix.MNT_DETACH)
		}
		os.RemoveAll(cache)
	})
	if err != nil {
		b.Fatalf("mount: %v\n%s", err, out)
	}
	return target, took
}

func benchUmount(b *testing.B, target string) {
	if out, err := exec.Command(binary, "umount", target).CombinedOutput(); err != nil {
		b.Fatalf("umount: %v\n%s", err, out)
	}
}

// BenchmarkPrefetch mounts an image of three layers, each with 100 small
// prioritized files and 8 MB of other files, over a shaped link and reads
// the 300 prioritized files one after the other: with prefetch they come
// with the mount, without it each costs a round trip.
//
//	go test -run XXX -bench Prefetch -benchtime 1x .
func BenchmarkPrefetch(b *testing.B) {
	benchSkip(b)
	host := lt.InProcessRegistry(b)
	var blobs []*lt.Blob
	var prio []string
	for l := range 3 {
		dir := fmt.Sprintf("l%d", l)
		entries := []lt.Entry{lt.Dir(dir)}
		var first []string
		for i := range 100 {
			name := fmt.Sprintf("%s/p%03d", dir, i)
			entries = append(entries, lt.File(name, lt.Random(name, 2000+i*97)))
			first = append(first, name)
		}
		for i := range 8 {
			name := fmt.Sprintf("%s/bulk%d", dir, i)
			entries = append(entries, lt.File(name, lt.Random(name, 1<<20)))
		}
		blob, err := lt.Estargz(lt.Tar(entries...), estargz.WithPrioritizedFiles(first))
		if err != nil {
			b.Fatal(err)
		}
		blobs = append(blobs, blob)
		prio = append(prio, first...)
	}
	img, err := lt.Image(blobs...)
	if err != nil {
		b.Fatal(err)
	}
	lt.Push(b, img, host+"/prefetch:1")
	proxy, err := netshape.New(host, netshape.WithDelay(benchDelay), netshape.WithBandwidth(benchBandwidth))
	if err != nil {
		b.Fatal(err)
	}
	defer proxy.Close()

	for _, prefetch := range []bool{true, false} {
		b.Run(fmt.Sprintf("prefetch=%v", prefetch), func(b *testing.B) {
			for b.Loop() {
				proxy.Reset()
				start := time.Now()
				target, mountTook := benchMount(b, proxy.Addr()+"/prefetch:1",
					"--background-fetch=false", fmt.Sprintf("--prefetch=%v", prefetch))
				atMount := proxy.Stats()
				for _, p := range prio {
					if _, err := os.ReadFile(filepath.Join(target, p)); err != nil {
						b.Fatal(err)
					}
				}
				total := time.Since(start)
				st := proxy.Stats()
				b.ReportMetric(total.Seconds(), "s-to-last-read")
				b.ReportMetric(float64(st.Requests), "requests")
				b.Logf("prefetch=%v: mount %.2f s (%d requests, %.1f MB), then 300 prioritized files read in %.2f s with %d more requests; %.2f s in all, %.1f MB",
					prefetch, mountTook.Seconds(), atMount.Requests, float64(atMount.Bytes)/1e6,
					(total - mountTook).Seconds(), st.Requests-atMount.Requests, total.Seconds(), float64(st.Bytes)/1e6)
				benchUmount(b, target)
			}
		})
	}
}

// BenchmarkBackgroundLatency reads 20 small files, one at a time, while
// background fetching is busy with a 64 MB layer over a shaped link, and
// reports the mean and worst read latency against the same reads with
// background fetching off.
//
//	go test -run XXX -bench BackgroundLatency -benchtime 1x .
func BenchmarkBackgroundLatency(b *testing.B) {
	benchSkip(b)
	host := lt.InProcessRegistry(b)
	entries := []lt.Entry{lt.Dir("big"), lt.Dir("small")}
	for i := range 16 {
		name := fmt.Sprintf("big/f%02d", i)
		entries = append(entries, lt.File(name, lt.Random(name, 4<<20)))
	}
	var small []string
	for i := range 20 {
		name := fmt.Sprintf("small/s%02d", i)
		entries = append(entries, lt.File(name, lt.Random(name, 10_000)))
		small = append(small, name)
	}
	img, err := lt.BuildImage(1<<20, entries)
	if err != nil {
		b.Fatal(err)
	}
	lt.Push(b, img, host+"/bg:1")
	proxy, err := netshape.New(host, netshape.WithDelay(benchDelay), netshape.WithBandwidth(benchBandwidth))
	if err != nil {
		b.Fatal(err)
	}
	defer proxy.Close()

	for _, bg := range []bool{false, true} {
		b.Run(fmt.Sprintf("background=%v", bg), func(b *testing.B) {
			for b.Loop() {
				target, _ := benchMount(b, proxy.Addr()+"/bg:1", fmt.Sprintf("--background-fetch=%v", bg))
				mounted := time.Now()
				time.Sleep(100 * time.Millisecond) // background fetch under way
				var lat []time.Duration
				for _, s := range small {
					start := time.Now()
					if _, err := os.ReadFile(filepath.Join(target, s)); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(start))
					time.Sleep(20 * time.Millisecond) // let background fetching resume
				}
				var sum time.Duration
				for _, d := range lat {
					sum += d
				}
				mean, worst := sum/time.Duration(len(lat)), slices.Max(lat)
				b.ReportMetric(float64(mean.Microseconds())/1000, "ms-mean-read")
				b.ReportMetric(float64(worst.Microseconds())/1000, "ms-worst-read")
				b.Logf("background=%v: 20 on-demand reads, mean %v, worst %v (link: %v per request, %.0f MB/s)",
					bg, mean.Round(100*time.Microsecond), worst.Round(100*time.Microsecond), benchDelay, benchBandwidth/1e6)
				if bg {
					// How long until the whole image is local.
					for {
						out, err := exec.Command(binary, "stats", "--json", target).Output()
						if err != nil {
							b.Fatal(err)
						}
						var s stats.Snapshot
						if err := json.Unmarshal(out, &s); err != nil {
							b.Fatal(err)
						}
						if !slices.ContainsFunc(s.Layers, func(l stats.Layer) bool { return !l.Complete }) {
							var n int64
							for _, l := range s.Layers {
								n += l.TotalBytes
							}
							el := time.Since(mounted)
							b.Logf("every layer complete %.2f s after the mount: %.1f MB, %.0f MB/s", el.Seconds(), float64(n)/1e6, float64(n)/1e6/el.Seconds())
							break
						}
						time.Sleep(20 * time.Millisecond)
					}
				}
				benchUmount(b, target)
			}
		})
	}
}
