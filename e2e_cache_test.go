package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// stoppableRegistry is an in-process registry a test can stop halfway.
func stoppableRegistry(t *testing.T) (host string, stop func()) {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), srv.Close
}

// files builds n files of about size bytes each under dir "d".
func files(n, size int) (map[string][]byte, []lt.Entry) {
	m := map[string][]byte{}
	entries := []lt.Entry{lt.Dir("d")}
	for i := range n {
		name := fmt.Sprintf("d/f%03d", i)
		m[name] = lt.Random(name, size+i*131)
		entries = append(entries, lt.File(name, m[name]))
	}
	return m, entries
}

// checkFiles reads every file of want under root and compares.
func checkFiles(t *testing.T, root string, want map[string][]byte) {
	t.Helper()
	for name, data := range want {
		got, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			t.Errorf("read %s: %v", name, err)
			continue
		}
		if !bytes.Equal(got, data) {
			t.Errorf("%s: wrong bytes (%d, want %d)", name, len(got), len(data))
		}
	}
}

// chunkFiles lists the disk cache's chunk files of every layer.
func chunkFiles(t *testing.T, cache string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(cache, "chunks", "sha256:*", "*"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range m {
		if filepath.Base(p) != "toc" {
			out = append(out, p)
		}
	}
	return out
}

func imageDigest(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// TestOfflineRemount mounts and reads an image, stops the registry, and
// mounts it again by digest and by tag from the cache alone.
func TestOfflineRemount(t *testing.T) {
	needFUSE(t)
	host, stop := stoppableRegistry(t)
	want, entries := files(20, 100<<10)
	img, err := lt.BuildImage(64<<10, []lt.Entry{lt.Dir("etc"), lt.FileString("etc/motd", "hi\n")}, entries)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/off:1")
	want["etc/motd"] = []byte("hi\n")

	e := newEnv(t)
	e.mount(host + "/off:1")
	checkFiles(t, e.target, want)
	e.umount()
	if n := len(chunkFiles(t, e.cache)); n < 20 {
		t.Fatalf("%d chunk files cached after reading everything", n)
	}
	stop()

	tests := []struct {
		name, ref string
		warning   bool
	}{
		{"by digest", host + "/off@" + imageDigest(t, img), false},
		{"by tag", host + "/off:1", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.t = t
			os.Remove(filepath.Join(e.cache, "stargz-mount.log"))
			e.mount(tt.ref)
			checkFiles(t, e.target, want)
			e.umount()
			e.assertClean()
			log, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
			if got := strings.Contains(string(log), "registry unreachable"); got != tt.warning {
				t.Errorf("warning logged = %v, want %v:\n%s", got, tt.warning, log)
			}
		})
	}
	t.Run("tag never resolved", func(t *testing.T) {
		e.t = t
		out, err := e.cmd("--daemon", host+"/off:2", e.target).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "unreachable") {
			t.Errorf("mount of an unknown tag offline: %v: %s", err, out)
		}
		e.assertClean()
	})
}

// TestCorruptCacheFile damages every cached chunk file on disk: each is
// detected on read, dropped, fetched again and rewritten.
func TestCorruptCacheFile(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	want, entries := files(8, 200<<10)
	img, err := lt.BuildImage(64<<10, entries)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/bad:1")
	e := newEnv(t)
	e.mount(host + "/bad:1")
	checkFiles(t, e.target, want)
	e.umount()

	chunks := chunkFiles(t, e.cache)
	if len(chunks) < 8 {
		t.Fatalf("%d chunk files cached", len(chunks))
	}
	orig := map[string][]byte{}
	for _, p := range chunks {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		orig[p] = b
		bad := append([]byte(nil), b...)
		bad[len(bad)/2] ^= 0x40
		if err := os.WriteFile(p, bad, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e.mount(host + "/bad:1")
	checkFiles(t, e.target, want)
	e.umount()
	e.assertClean()
	log, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
	if n := strings.Count(string(log), "dropping corrupt cache entry"); n != len(chunks) {
		t.Errorf("%d corrupt entries logged, want %d", n, len(chunks))
	}
	for p, b := range orig {
		if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, b) {
			t.Errorf("%s not repaired: %v", filepath.Base(p), err)
		}
	}
}

// sibling returns an env sharing e's cache dir with a mount point of its own.
func (e *env) sibling() *env {
	e.t.Helper()
	s := &env{t: e.t, cache: e.cache, target: filepath.Join(e.t.TempDir(), "mnt")}
	if err := os.Mkdir(s.target, 0o755); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if mounted(s.target) {
			exec.Command(binary, "umount", s.target).Run()
		}
	})
	return s
}

func layerDigests(t *testing.T, img v1.Image) []string {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		d, _ := l.Digest()
		out = append(out, d.String())
	}
	return out
}

type lsEntry struct {
	Name    string `json:"name"`
	Kind    string `json:"kind"`
	Entries int    `json:"entries"`
	Bytes   int64  `json:"bytes"`
	InUse   bool   `json:"inUse"`
}

func (e *env) cacheLs() map[string]lsEntry {
	e.t.Helper()
	out, err := exec.Command(binary, "cache", "ls", "--json", "--cache-dir", e.cache).Output()
	if err != nil {
		e.t.Fatalf("cache ls: %v", err)
	}
	var list []lsEntry
	if err := json.Unmarshal(out, &list); err != nil {
		e.t.Fatalf("cache ls output: %v\n%s", err, out)
	}
	m := map[string]lsEntry{}
	for _, g := range list {
		m[g.Name] = g
	}
	return m
}

// TestCachePrune: prune removes what no live mount needs and keeps the
// layers of a live one, which keeps reading.
func TestCachePrune(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	wantA, entriesA := files(6, 100<<10)
	wantB, entriesB := files(5, 90<<10)
	imgA, err := lt.BuildImage(64<<10, entriesA)
	if err != nil {
		t.Fatal(err)
	}
	imgB, err := lt.BuildImage(64<<10, entriesB, []lt.Entry{lt.FileString("b", "b\n")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, imgA, host+"/a:1")
	lt.Push(t, imgB, host+"/b:1")
	a := newEnv(t)
	b := a.sibling()
	b.mount(host + "/b:1")
	checkFiles(t, b.target, wantB)
	b.umount()
	a.mount(host + "/a:1")
	checkFiles(t, a.target, wantA)

	ls := a.cacheLs()
	var total int64
	for _, g := range ls {
		total += g.Bytes
	}
	for _, d := range layerDigests(t, imgA) {
		if g := ls[d]; !g.InUse || g.Entries < 6 || g.Kind != "layer" {
			t.Errorf("live layer %s: %+v", d, g)
		}
	}
	for _, d := range layerDigests(t, imgB) {
		if g, ok := ls[d]; !ok || g.InUse {
			t.Errorf("idle layer %s: %+v", d, g)
		}
	}
	if ls["meta"].Kind != "metadata" || ls["meta"].Entries < 4 {
		t.Errorf("metadata: %+v", ls["meta"])
	}
	out, err := exec.Command(binary, "cache", "du", "--cache-dir", a.cache).Output()
	if err != nil || !strings.Contains(string(out), fmt.Sprintf("\t%d bytes\t", total)) {
		t.Errorf("cache du = %q, %v; want %d bytes", out, err, total)
	}

	out, err = exec.Command(binary, "cache", "prune", "--all", "--cache-dir", a.cache).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "kept 1 layer(s) of live mounts") {
		t.Errorf("prune --all: %v: %s", err, out)
	}
	ls = a.cacheLs()
	for _, d := range layerDigests(t, imgB) {
		if _, ok := ls[d]; ok {
			t.Errorf("idle layer %s kept by prune --all", d)
		}
	}
	for _, d := range layerDigests(t, imgA) {
		if g := ls[d]; g.Entries < 6 {
			t.Errorf("live layer %s pruned: %+v", d, g)
		}
	}
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0)
	checkFiles(t, a.target, wantA)
	a.umount()
	a.assertClean()

	// Not live any more: --max 0 takes it.
	if out, err := exec.Command(binary, "cache", "prune", "--max", "0", "--cache-dir", a.cache).CombinedOutput(); err != nil {
		t.Fatalf("prune --max 0: %v: %s", err, out)
	}
	if ls := a.cacheLs(); len(ls) != 0 {
		t.Errorf("left after prune --max 0: %+v", ls)
	}
}
