package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	fp "github.com/stargz-mount/stargz-mount/internal/faultproxy"
	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// TestCorpusThroughFaults mounts the test corpus through a proxy that
// injects every kind of fault into blob reads and redirects them to a
// second server whose signed URLs expire mid-test: the tree must match
// umoci's unpack bit for bit.
func TestCorpusThroughFaults(t *testing.T) {
	needFUSE(t)
	reg := lt.DistributionRegistry(t)
	img, err := lt.BuildImage(lt.CorpusChunkSize, lt.Corpus()...)
	if err != nil {
		t.Fatal(err)
	}
	ref := "/corpus:latest"
	lt.Push(t, img, reg.Addr+ref)
	want := lt.UmociRootfs(t, reg.Addr+ref)

	tests := []struct {
		name string
		opts []fp.Option
	}{
		{"faults, redirected", []fp.Option{fp.WithRate(0.1), fp.WithRedirect(), fp.WithSeed(3)}},
		// Multi-range refusal is covered by fetcher's TestReadRanges: the
		// corpus's reads do not leave the gaps that make multi-range
		// requests.
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := fp.New(reg.Addr, tt.opts...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			e := newEnv(t)
			// Stalls last a third of the fetch timeout: one read survives
			// all the scripted faults below (backoffs ≤ 6.3 s, 429's 1 s,
			// a 5 s stall) within it.
			e.mount(p.Addr()+ref, "--fetch-timeout", "15s")
			p.ExpireRedirects() // the locations cached while mounting go stale
			// Every fault once on the first data reads, then at random.
			p.Script(fp.Reset, fp.Status500, fp.Status503, fp.TooMany, fp.Truncate, fp.Stall, fp.WrongRange)
			if diffs := lt.CompareTrees(want, e.target, lt.FormatFiles...); len(diffs) > 0 {
				t.Errorf("%d differences through faults:\n%s", len(diffs), strings.Join(diffs, "\n"))
			}
			e.umount()
			e.assertClean()
			s := p.Stats()
			t.Logf("proxy: %d blob range requests, %d faults %v, %d redirects, %d stale, %d multi-range", s.Requests, s.TotalFaults, s.Injected, s.Redirects, s.Stale, s.MultiRange)
			if s.TotalFaults < 7 {
				t.Errorf("only %d faults injected: the test tested little", s.TotalFaults)
			}
		})
	}
}

// TestRegistryGone: with the registry gone, a read fails with EIO within
// the fetch timeout and one log line naming layer, range and cause, while
// stat and readdir still answer; once it is back, reads succeed again.
func TestRegistryGone(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	data := lt.Random("gone", 300<<10)
	img, err := lt.BuildImage(64<<10, []lt.Entry{lt.Dir("d"), lt.File("d/f", data), lt.FileString("d/g", "small\n")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/gone:1")
	p, err := fp.New(host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	e := newEnv(t)
	e.mount(p.Addr()+"/gone:1", "--fetch-timeout", "3s", "--background-fetch=false")
	p.SetDown(true)

	start := time.Now()
	_, err = os.ReadFile(filepath.Join(e.target, "d/f"))
	took := time.Since(start)
	if !errorsIs(err, syscall.EIO) {
		t.Errorf("read with the registry gone: %v, want EIO", err)
	}
	if took > 5*time.Second {
		t.Errorf("read failed after %s, want within the 3s fetch timeout", took)
	}
	if st, err := os.Stat(filepath.Join(e.target, "d/f")); err != nil || st.Size() != int64(len(data)) {
		t.Errorf("stat with the registry gone: %v", err)
	}
	if ents, err := os.ReadDir(filepath.Join(e.target, "d")); err != nil || len(ents) != 2 {
		t.Errorf("readdir with the registry gone: %d entries, %v", len(ents), err)
	}

	p.SetDown(false)
	time.Sleep(600 * time.Millisecond) // past the failure memory
	got, err := os.ReadFile(filepath.Join(e.target, "d/f"))
	if err != nil || string(got) != string(data) {
		t.Errorf("read once the registry is back: %v", err)
	}
	e.umount()
	e.assertClean()

	log, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
	var failed []string
	for _, l := range strings.Split(string(log), "\n") {
		if strings.Contains(l, "read failed") {
			failed = append(failed, l)
		}
	}
	if len(failed) < 1 {
		t.Errorf("no 'read failed' log line:\n%s", log)
	} else if l := failed[0]; !strings.Contains(l, "layer=sha256:") || !strings.Contains(l, "bytes ") || !strings.Contains(l, "gave up after") {
		t.Errorf("log line does not name layer, range and cause: %s", l)
	}
}
