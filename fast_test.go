package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/registry"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
	"github.com/stargz-mount/stargz-mount/stats"
)

// blobRequest is one blob GET the registry answered.
type blobRequest struct {
	digest string
	start  int64 // first byte of the Range, -1 without one
	bytes  int64 // body bytes sent
}

// countingRegistry is the in-process registry behind a handler that logs
// every blob GET and can be taken down.
type countingRegistry struct {
	addr string
	down atomic.Bool // answer everything with 503
	// hold, if set before the first request, stalls blob reads that
	// start in the first KiB (prefetch reads) until it is closed.
	hold chan struct{}

	mu   sync.Mutex // guards log and refused
	log  []blobRequest
	seen int // requests while down
}

var blobPath = regexp.MustCompile(`/blobs/(sha256:[0-9a-f]{64})$`)

func newCountingRegistry(t *testing.T) *countingRegistry {
	r := &countingRegistry{}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.down.Load() {
			r.mu.Lock()
			r.seen++
			r.mu.Unlock()
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		m := blobPath.FindStringSubmatch(req.URL.Path)
		if m == nil || req.Method != http.MethodGet {
			reg.ServeHTTP(w, req)
			return
		}
		br := blobRequest{digest: m[1], start: -1}
		if s, ok := strings.CutPrefix(req.Header.Get("Range"), "bytes="); ok {
			br.start, _ = strconv.ParseInt(strings.Split(s, "-")[0], 10, 64)
		}
		if r.hold != nil && br.start >= 0 && br.start < 1024 {
			<-r.hold
		}
		cw := &countingWriter{ResponseWriter: w}
		reg.ServeHTTP(cw, req)
		br.bytes = cw.n
		r.mu.Lock()
		r.log = append(r.log, br)
		r.mu.Unlock()
	}))
	t.Cleanup(srv.Close)
	r.addr = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// settle waits up to 2 s for want blob GETs of digest to be logged and
// returns how many there are then (more if more came).
func (r *countingRegistry) settle(digest string, want int) int {
	deadline := time.Now().Add(2 * time.Second)
	for {
		n := len(r.requests(digest))
		if n >= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// requests returns the blob GETs for digest so far.
func (r *countingRegistry) requests(digest string) []blobRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []blobRequest
	for _, b := range r.log {
		if b.digest == digest {
			out = append(out, b)
		}
	}
	return out
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

// fastImage is two layers whose prioritized files come first, behind a
// landmark, and the contents of every file by path.
func fastImage(t *testing.T, host string) (ref string, digests []string, prio map[string][]string, files map[string][]byte) {
	t.Helper()
	files = map[string][]byte{}
	prio = map[string][]string{}
	var blobs []*lt.Blob
	for li, dir := range []string{"lo", "hi"} {
		entries := []lt.Entry{lt.Dir(dir)}
		var first []string
		for i := range 12 {
			for _, kind := range []string{"p", "r"} {
				name := fmt.Sprintf("%s/%s%02d", dir, kind, i)
				files[name] = lt.Random(name, 100_000+i*3000)
				entries = append(entries, lt.File(name, files[name]))
				if kind == "p" {
					first = append(first, name)
				}
			}
		}
		b, err := lt.Estargz(lt.Tar(entries...), estargz.WithChunkSize(64<<10), estargz.WithPrioritizedFiles(first))
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, b)
		digests = append(digests, b.Digest.String())
		prio[b.Digest.String()] = first
		_ = li
	}
	img, err := lt.Image(blobs...)
	if err != nil {
		t.Fatal(err)
	}
	ref = host + "/fast:1"
	lt.Push(t, img, ref)
	return ref, digests, prio, files
}

// statsOf runs `stargz-mount stats --json` on the env's mount.
func (e *env) stats() stats.Snapshot {
	e.t.Helper()
	out, err := exec.Command(binary, "stats", "--json", e.target).Output()
	if err != nil {
		e.t.Fatalf("stats: %v", err)
	}
	var s stats.Snapshot
	if err := json.Unmarshal(out, &s); err != nil {
		e.t.Fatalf("stats output: %v\n%s", err, out)
	}
	return s
}

func (e *env) read(name string, want []byte) {
	e.t.Helper()
	got, err := os.ReadFile(filepath.Join(e.target, name))
	if err != nil {
		e.t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		e.t.Fatalf("%s: wrong bytes", name)
	}
}

// checkStats compares each layer's request and byte counts with the
// registry's log. Bytes match exactly only without background fetching:
// a background request abandoned for an on-demand read leaves bytes the
// registry sent and the client never read.
func checkStats(t *testing.T, s stats.Snapshot, reg *countingRegistry, exactBytes bool) {
	t.Helper()
	for _, l := range s.Layers {
		log := reg.requests(l.Digest)
		var n int64
		for _, r := range log {
			n += r.bytes
		}
		if l.Requests != int64(len(log)) || l.TransferredBytes > n || (exactBytes && l.TransferredBytes != n) {
			t.Errorf("layer %s: stats say %d requests, %d bytes; registry log %d, %d", l.Digest, l.Requests, l.TransferredBytes, len(log), n)
		}
	}
}

// settledStats returns the mount's stats once every byte the registry
// logged has been received (the end of a streamed response may still be
// on its way when a read returns), or after 2 s.
func settledStats(e *env, reg *countingRegistry) stats.Snapshot {
	deadline := time.Now().Add(2 * time.Second)
	for {
		s := e.stats()
		settled := true
		for _, l := range s.Layers {
			var n int64
			for _, r := range reg.requests(l.Digest) {
				n += r.bytes
			}
			settled = settled && l.TransferredBytes == n
		}
		if settled || time.Now().After(deadline) {
			return s
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPrefetchOnMount(t *testing.T) {
	needFUSE(t)
	reg := newCountingRegistry(t)
	ref, digests, prio, files := fastImage(t, reg.addr)
	e := newEnv(t)
	e.mount(ref, "--background-fetch=false", "--metrics-addr", "127.0.0.1:0")

	s := e.stats()
	if len(s.Layers) != 2 {
		t.Fatalf("stats have %d layers", len(s.Layers))
	}
	for i, l := range s.Layers {
		reg.settle(digests[i], 2)
		log := reg.requests(digests[i])
		// The tail with footer and TOC, and the prioritized region.
		var data []blobRequest
		for _, r := range log {
			if r.start < l.PrefetchBytes {
				data = append(data, r)
			}
		}
		if l.Digest != digests[i] || l.PrefetchBytes <= 0 || l.Prefetch != "done" || len(log) != 2 || len(data) != 1 {
			t.Errorf("layer %d: %d requests (%d for the prioritized region), stats %+v", i, len(log), len(data), l)
		}
		if l.Complete || l.FetchedBytes <= 0 || l.FetchedBytes >= l.TotalBytes || l.Background != "off" {
			t.Errorf("layer %d after prefetch: %+v", i, l)
		}
	}
	checkStats(t, s, reg, true)

	// Prioritized files come from the cache.
	for _, d := range digests {
		for _, p := range prio[d] {
			e.read(p, files[p])
		}
	}
	for i, d := range digests {
		if n := len(reg.requests(d)); n != 2 {
			t.Errorf("layer %d: reading prioritized files made %d requests", i, n-2)
		}
	}
	// Others are fetched. A read returns as soon as its chunks are in,
	// possibly before the registry has finished the response it logs.
	e.read("hi/r03", files["hi/r03"])
	if n := reg.settle(digests[1], 3); n != 3 {
		t.Errorf("reading hi/r03: %d requests in all, want 3", n)
	}
	s = settledStats(e, reg)
	checkStats(t, s, reg, true)
	// r03 misses at least once (reads of its later chunks may miss too,
	// while they stream in); the prioritized files all hit.
	if hi := s.Layers[1]; hi.MemoryMisses < 1 || hi.MemoryHits < int64(len(prio[digests[1]])) {
		t.Errorf("hi layer hits/misses: %d/%d", hi.MemoryHits, hi.MemoryMisses)
	}

	// The same numbers as Prometheus text, at the address in the log.
	logb, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
	m := regexp.MustCompile(`url=(http://127\.0\.0\.1:\d+/metrics)`).FindSubmatch(logb)
	if m == nil {
		t.Fatalf("no metrics URL in the log:\n%s", logb)
	}
	resp, err := http.Get(string(m[1]))
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := fmt.Sprintf("stargz_mount_layer_requests_total{mountpoint=%q,layer=%q} %d\n", e.target, digests[1], len(reg.requests(digests[1])))
	if !strings.Contains(string(metrics), want) {
		t.Errorf("metrics lack %q:\n%s", want, metrics)
	}

	e.umount()
	e.assertClean()
	sock := stats.SocketPath(stats.RuntimeDir(), e.target)
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("stats socket %s left after unmount: %v", sock, err)
	}
	out, err := exec.Command(binary, "stats", e.target).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not an image mounted by a running stargz-mount") {
		t.Errorf("stats after unmount: %v\n%s", err, out)
	}
}

func TestPrefetchOff(t *testing.T) {
	needFUSE(t)
	reg := newCountingRegistry(t)
	ref, digests, _, _ := fastImage(t, reg.addr)
	e := newEnv(t)
	out, err := e.cmd("--daemon", "--metrics-addr", "0.0.0.0:0", ref, e.target).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "loopback") {
		t.Errorf("--metrics-addr 0.0.0.0:0: %v\n%s", err, out)
	}
	e.assertClean()
	for i, d := range digests {
		if n := len(reg.requests(d)); n != 0 {
			t.Errorf("layer %d: a refused --metrics-addr still made %d requests", i, n)
		}
	}
	e.mount(ref, "--background-fetch=false", "--prefetch=false")
	for i, d := range digests {
		if n := len(reg.requests(d)); n != 1 {
			t.Errorf("layer %d: %d requests with --prefetch=false, want 1 (the TOC)", i, n)
		}
	}
	e.umount()
	e.assertClean()
}

func TestBackgroundFetchAndRecord(t *testing.T) {
	needFUSE(t)
	reg := newCountingRegistry(t)
	ref, _, _, files := fastImage(t, reg.addr)
	e := newEnv(t)
	record := filepath.Join(t.TempDir(), "record.json")
	e.mount(ref, "--record", record)

	// What this test reads, in order; lo/p00 twice.
	order := []string{"hi/r05", "lo/p00", "hi/p01", "lo/r07", "lo/p00"}
	for _, n := range order {
		e.read(n, files[n])
	}
	deadline := time.Now().Add(60 * time.Second)
	var s stats.Snapshot
	for {
		s = e.stats()
		if !slices.ContainsFunc(s.Layers, func(l stats.Layer) bool { return !l.Complete }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("layers not complete after 60 s: %+v", s.Layers)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, l := range s.Layers {
		if l.FetchedBytes != l.TotalBytes || l.Background != "done" {
			t.Errorf("complete layer: %+v", l)
		}
	}
	checkStats(t, s, reg, false)

	// With every layer local, the registry is not needed any more.
	reg.down.Store(true)
	for n, want := range files {
		e.read(n, want)
	}
	reg.mu.Lock()
	seen := reg.seen
	reg.mu.Unlock()
	if seen != 0 {
		t.Errorf("%d requests reached the registry after every layer was complete", seen)
	}

	e.umount()
	e.assertClean()
	b, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		Layers []struct {
			Digest string   `json:"digest"`
			Paths  []string `json:"paths"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("record: %v\n%s", err, b)
	}
	if len(rec.Layers) != 2 {
		t.Fatalf("record has %d layers:\n%s", len(rec.Layers), b)
	}
	// The reads before the registry went down, then every other file.
	lo, hi := rec.Layers[0].Paths, rec.Layers[1].Paths
	if len(lo) != 24 || len(hi) != 24 || !slices.Equal(lo[:2], []string{"/lo/p00", "/lo/r07"}) || hi[0] != "/hi/r05" || hi[1] != "/hi/p01" {
		t.Errorf("record:\n%s", b)
	}
}

func TestPrefetchTimeout(t *testing.T) {
	needFUSE(t)
	reg := newCountingRegistry(t)
	ref, digests, prio, files := fastImage(t, reg.addr)
	reg.hold = make(chan struct{})
	e := newEnv(t)
	start := time.Now()
	e.mount(ref, "--background-fetch=false", "--prefetch-timeout", "300ms")
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("mount with a stalled prefetch took %v", took)
	}
	for _, l := range e.stats().Layers {
		if l.Prefetch != "running" {
			t.Errorf("layer %s: prefetch %q while its request is stalled", l.Digest, l.Prefetch)
		}
	}
	close(reg.hold) // prefetch goes on after the mount is ready
	deadline := time.Now().Add(20 * time.Second)
	for slices.ContainsFunc(e.stats().Layers, func(l stats.Layer) bool { return l.Prefetch != "done" }) {
		if time.Now().After(deadline) {
			t.Fatal("prefetch not done 20 s after the registry answered")
		}
		time.Sleep(20 * time.Millisecond)
	}
	before := len(reg.requests(digests[0]))
	for _, p := range prio[digests[0]] {
		e.read(p, files[p])
	}
	if n := len(reg.requests(digests[0])) - before; n != 0 {
		t.Errorf("prioritized files made %d requests after a late prefetch", n)
	}
	e.umount()
	e.assertClean()
}

func TestStatsNotMounted(t *testing.T) {
	dir := t.TempDir()
	out, err := exec.Command(binary, "stats", dir).CombinedOutput()
	if err == nil || !strings.Contains(string(out), dir+" is not an image mounted by a running stargz-mount") {
		t.Errorf("stats on a plain directory: %v\n%s", err, out)
	}
}

// waitComplete polls stats until every layer is complete.
func (e *env) waitComplete(within time.Duration) stats.Snapshot {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for {
		s := e.stats()
		if !slices.ContainsFunc(s.Layers, func(l stats.Layer) bool { return !l.Complete }) {
			return s
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("layers not complete after %v: %+v", within, s.Layers)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCompleteSurvivesRemount fetches an image completely, unmounts it and
// mounts it again with the registry down: the disk cache has everything,
// and the layers are complete again without a request.
func TestCompleteSurvivesRemount(t *testing.T) {
	needFUSE(t)
	reg := newCountingRegistry(t)
	ref, _, _, files := fastImage(t, reg.addr)
	out, err := exec.Command(binary, "inspect", "--json", ref).Output()
	if err != nil {
		t.Fatal(err)
	}
	var info struct{ Digest string }
	if err := json.Unmarshal(out, &info); err != nil || info.Digest == "" {
		t.Fatalf("inspect: %v\n%s", err, out)
	}
	e := newEnv(t)
	e.mount(ref)
	e.waitComplete(60 * time.Second)
	e.umount()
	e.assertClean()

	// By digest, the manifest comes from the metadata cache too.
	reg.down.Store(true)
	e.mount(strings.TrimSuffix(ref, ":1") + "@" + info.Digest)
	s := e.waitComplete(30 * time.Second)
	for _, l := range s.Layers {
		if l.Prefetch != "done" || l.Background != "done" || l.DataRequests != 0 {
			t.Errorf("remounted layer: %+v", l)
		}
	}
	for n, want := range files {
		e.read(n, want)
	}
	reg.mu.Lock()
	seen := reg.seen
	reg.mu.Unlock()
	if seen != 0 {
		t.Errorf("%d requests reached the registry for a fully cached image", seen)
	}
	e.umount()
	e.assertClean()
}
