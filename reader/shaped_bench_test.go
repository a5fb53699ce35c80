package reader

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/stargz-mount/stargz-mount/fetcher"
	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
	"github.com/stargz-mount/stargz-mount/internal/netshape"
)

// BenchmarkShapedLink reads a 256 MiB file (eStargz default 4 MiB chunks)
// from an in-process registry behind a link of 30 ms per request and
// 100 MB/s, and reports side by side:
//
//   - get: one plain GET of the whole blob (MB/s), the link's best;
//   - sequential: a cold front-to-back read in 128 KiB reads, as the
//     kernel sends them (MB/s, requests per MiB, fraction of get's MB/s);
//   - random4k: cold 4 KiB reads at random offsets (ms and requests each).
func BenchmarkShapedLink(b *testing.B) {
	var getCPU, seqCPU time.Duration
	const size = 256 << 20
	host := lt.InProcessRegistry(b)
	img, err := lt.BuildImage(4<<20, lt.BigFileLayer(size))
	if err != nil {
		b.Fatal(err)
	}
	lt.Push(b, img, host+"/big:1")
	proxy, err := netshape.New(host, netshape.WithDelay(30*time.Millisecond), netshape.WithBandwidth(100e6))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { proxy.Close() })
	ref := proxy.Addr() + "/big:1"
	m, _ := img.Manifest()
	layer := m.Layers[0]
	tocDigest := digest.Digest(layer.Annotations["containerd.io/snapshot/stargz/toc.digest"])

	open := func(b *testing.B) (*Layer, *fetcher.Blob, *Node) {
		im, err := fetcher.Resolve(context.Background(), ref)
		if err != nil {
			b.Fatal(err)
		}
		blob := im.Blob(im.Layers[0])
		l, err := Open(context.Background(), blob, WithTOCDigest(tocDigest), WithCache(NewCache(256<<20)))
		if err != nil {
			b.Fatal(err)
		}
		n, ok := l.Root().Lookup("big")
		if ok {
			n, ok = n.Lookup("file")
		}
		if !ok {
			b.Fatal("big/file not found")
		}
		return l, blob, n
	}

	getRate := func(b *testing.B) float64 {
		defer cpuAdd(&getCPU)()
		start := time.Now()
		resp, err := http.Get(fmt.Sprintf("http://%s/v2/big/blobs/%s", proxy.Addr(), layer.Digest))
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != layer.Size {
			b.Fatalf("GET: %d bytes, %v", n, err)
		}
		return float64(n) / time.Since(start).Seconds()
	}

	b.Run("sequential", func(b *testing.B) {
		var get, seq, reqs, mib float64
		getCPU, seqCPU = 0, 0
		for b.Loop() {
			get += getRate(b)
			l, blob, n := open(b)
			before := blob.Stats().Requests
			p := make([]byte, 128<<10)
			stop := cpuAdd(&seqCPU)
			start := time.Now()
			for off := int64(0); off < n.Size; off += int64(len(p)) {
				if _, err := l.ReadAt(context.Background(), n, p, off); err != nil && err != io.EOF {
					b.Fatal(err)
				}
			}
			seq += float64(n.Size) / time.Since(start).Seconds()
			stop()
			reqs += float64(blob.Stats().Requests - before)
			mib += float64(n.Size) / (1 << 20)
		}
		runs := float64(b.N)
		b.ReportMetric(get/runs/1e6, "get_MB/s")
		b.ReportMetric(seq/runs/1e6, "seq_MB/s")
		b.ReportMetric(seq/get, "seq/get")
		b.ReportMetric(reqs/mib, "req/MiB")
		// CPU seconds of the whole process (proxy and registry included):
		// on a loaded machine, a read that needs more CPU than the
		// process gets cannot reach the link's speed.
		b.ReportMetric(getCPU.Seconds()/runs, "get_cpu_s")
		b.ReportMetric(seqCPU.Seconds()/runs, "seq_cpu_s")
	})

	b.Run("random4k", func(b *testing.B) {
		l, blob, n := open(b)
		r := rand.New(rand.NewPCG(1, 2))
		p := make([]byte, 4096)
		before := blob.Stats().Requests
		var total time.Duration
		reads := 0
		for b.Loop() {
			off := r.Int64N(n.Size - int64(len(p)))
			start := time.Now()
			if _, err := l.ReadAt(context.Background(), n, p, off); err != nil {
				b.Fatal(err)
			}
			total += time.Since(start)
			reads++
		}
		b.ReportMetric(float64(total.Milliseconds())/float64(reads), "ms/read")
		b.ReportMetric(float64(blob.Stats().Requests-before)/float64(reads), "req/read")
	})
}

// cpuAdd starts measuring the process's CPU time; the returned function
// adds what was used since to *d.
func cpuAdd(d *time.Duration) func() {
	t0 := cpuTime()
	return func() { *d += cpuTime() - t0 }
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
