package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"

	"github.com/stargz-mount/stargz-mount/internal/netshape"
)

// bench holds what every measurement needs.
type bench struct {
	bin    string // stargz-mount built from the repo
	work   string // scratch directory; every mount lives under it
	proxy  *netshape.Proxy
	memory string // --cache-max-memory
	tracer *tracer
	traces map[string][]request // the last cold python3 run of each image, by reference
}

// sample is one run of one case: metric name → value.
type sample map[string]float64

// mounted reports whether dir is a mount point.
func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// cleanupMounts removes whatever is still mounted under dir: the tool's
// umount first, then lazy unmounts.
func cleanupMounts(bin, dir string) {
	b, _ := os.ReadFile("/proc/self/mounts")
	var left []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && (f[1] == dir || strings.HasPrefix(f[1], dir+"/")) {
			left = append(left, f[1])
		}
	}
	for i := len(left) - 1; i >= 0; i-- {
		if mounted(left[i]) {
			exec.Command(bin, "umount", left[i]).Run()
		}
		if mounted(left[i]) {
			unix.Unmount(left[i], unix.MNT_DETACH)
		}
	}
}

// mountDaemon runs stargz-mount --daemon and returns the seconds until it
// returned (the mount is ready then).
func (b *bench) mountDaemon(ref, cache, mnt string, extra ...string) (float64, error) {
	args := append([]string{"--cache-dir", cache, "--cache-max-memory", b.memory, "--daemon"}, extra...)
	args = append(args, ref, mnt)
	start := time.Now()
	out, err := exec.Command(b.bin, args...).CombinedOutput()
	d := time.Since(start).Seconds()
	if err != nil {
		return d, fmt.Errorf("stargz-mount %s: %v: %s", ref, err, firstLine(out))
	}
	return d, nil
}

func (b *bench) umount(mnt string) error {
	if out, err := exec.Command(b.bin, "umount", mnt).CombinedOutput(); err != nil {
		return fmt.Errorf("stargz-mount umount %s: %v: %s", mnt, err, firstLine(out))
	}
	// The server exits after the unmount; wait for it so its RSS and
	// CPU do not leak into the next case.
	for deadline := time.Now().Add(10 * time.Second); serverPID(b.bin, mnt) != 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

func firstLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	lines := strings.Split(s, "\n")
	return lines[len(lines)-1]
}

// serverPID finds the background server serving mnt.
func serverPID(bin, mnt string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if len(args) > 1 && args[0] == bin && args[len(args)-1] == mnt {
			return pid
		}
	}
	return 0
}

// peakRSS returns the VmHWM of pid in bytes.
func peakRSS(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.ParseFloat(f[0], 64)
				return kb * 1024
			}
		}
	}
	return 0
}

// cpuSeconds returns the user+system CPU time pid has used.
func cpuSeconds(pid int) float64 {
	return (statField(pid, 14) + statField(pid, 15)) / 100 // USER_HZ is 100 on Linux
}

// machineCPU returns the busy and total CPU time of the machine so far,
// in clock ticks, from /proc/stat.
func machineCPU() (busy, all float64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		x, _ := strconv.ParseFloat(v, 64)
		all += x
		if i != 3 && i != 4 { // idle, iowait
			busy += x
		}
	}
	return busy, all
}

// minorFaults returns the minor page faults pid has taken.
func minorFaults(pid int) float64 { return statField(pid, 10) }

// statField returns field k (1-based, as in proc(5)) of /proc/pid/stat.
func statField(pid, k int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) start at
	// state, field 3.
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < k-2 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[k-3], 64)
	return v
}

// python runs python3 -c 'print(1)' chrooted in root and returns seconds.
func python(root string) (float64, error) {
	start := time.Now()
	out, err := exec.Command("chroot", root, "python3", "-c", "print(1)").CombinedOutput()
	d := time.Since(start).Seconds()
	if err != nil || strings.TrimSpace(string(out)) != "1" {
		return d, fmt.Errorf("chroot %s python3: %v: %q", root, err, out)
	}
	return d, nil
}

// catFile reads path with cat into /dev/null and returns seconds.
func catFile(path string) (float64, error) {
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	var errb bytes.Buffer
	cmd := exec.Command("cat", path)
	cmd.Stdout, cmd.Stderr = devnull, &errb
	start := time.Now()
	err = cmd.Run()
	d := time.Since(start).Seconds()
	if err != nil {
		return d, fmt.Errorf("cat %s: %v: %s", path, err, errb.String())
	}
	return d, nil
}

// dropCaches drops the page cache (system-wide).
func dropCaches() error {
	unix.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0o200)
}

// supports reports whether the stargz-mount under test has flag.
func (b *bench) supports(flag string) bool {
	help, _ := exec.Command(b.bin, "--help").CombinedOutput()
	return strings.Contains(string(help), flag+" ")
}

// recordWithTool mounts ref with --record, runs python3 in it, unmounts
// and returns the files stargz-mount saw read, relative to the root.
func (b *bench) recordWithTool(ref string) ([]string, error) {
	if !b.supports("--record") {
		return nil, fmt.Errorf("this stargz-mount has no --record")
	}
	cache, mnt, cleanup, err := b.scratch()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	recFile := filepath.Join(b.work, "record.json")
	if _, err := b.mountDaemon(ref, cache, mnt, "--record", recFile, "--background-fetch=false"); err != nil {
		return nil, err
	}
	if _, err := python(mnt); err != nil {
		return nil, err
	}
	if err := b.umount(mnt); err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(recFile)
	if err != nil {
		return nil, fmt.Errorf("--record wrote nothing: %w", err)
	}
	var rec struct {
		Layers []struct {
			Paths []string `json:"paths"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return nil, fmt.Errorf("--record file: %w", err)
	}
	var files []string
	for _, l := range rec.Layers {
		for _, p := range l.Paths {
			files = append(files, strings.TrimPrefix(p, "/"))
		}
	}
	return files, nil
}

// mountPython measures one python image from cold: mount ready, python3
// finished, what went through the proxy, and the server's peak RSS. The
// request timeline is kept under name.
func (b *bench) mountPython(name, ref string, flags ...string) (sample, error) {
	cache, mnt, cleanup, err := b.scratch()
	if err != nil {
		return nil, err
	}
	defer cleanup()

	b.proxy.Reset()
	b.tracer.reset()
	ready, err := b.mountDaemon(ref, cache, mnt, flags...)
	if err != nil {
		return nil, err
	}
	pid := serverPID(b.bin, mnt)
	cpu0 := cpuSeconds(pid)
	py, err := python(mnt)
	if err != nil {
		return nil, err
	}
	serverCPU := cpuSeconds(pid) - cpu0
	st := b.proxy.Stats()
	reqs := b.tracer.take()
	// The moment the mount was ready, as a marker in the timeline.
	b.traces[name] = append(reqs, request{Start: ready, End: ready, What: "(mount ready; python3 starts)"})
	var during []request
	for _, r := range reqs {
		if r.Start >= ready {
			during = append(during, r)
		}
	}
	// Again in the same mount: what the run costs with nothing to fetch.
	warm, err := python(mnt)
	if err != nil {
		return nil, err
	}
	s := sample{
		"mount_ready_s":  ready,
		"python_run_s":   py,
		"python_warm_s":  warm,
		"python_ready_s": ready + py,
		"bytes":          float64(st.Bytes),
		"requests":       float64(st.Requests),
		"peak_rss_bytes": peakRSS(serverPID(b.bin, mnt)),
		// What the python3 run waited for: requests after the mount
		// was ready, and how many overlapped.
		"python_requests":      float64(len(during)),
		"python_server_cpu_s":  serverCPU,
		"python_max_in_flight": float64(maxInFlight(during)),
	}
	return s, b.umount(mnt)
}

// fullPull is the baseline: resolve ref through the proxy, GET every layer
// blob and unpack it to disk (go-containerregistry streams the blob into
// GNU tar -xz), then run python3 in the result.
func (b *bench) fullPull(ref string) (sample, error) {
	dir, err := os.MkdirTemp(b.work, "pull")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	b.proxy.Reset()
	start := time.Now()
	img, err := remote.Image(r)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return nil, err
		}
		var errb bytes.Buffer
		cmd := exec.Command("tar", "-xz", "--numeric-owner", "-C", dir, "-f", "-")
		cmd.Stdin, cmd.Stderr = rc, &errb
		err = cmd.Run()
		rc.Close()
		if err != nil {
			return nil, fmt.Errorf("unpack layer of %s: %v: %s", ref, err, errb.String())
		}
	}
	// No sync: the baseline counts a pull done once tar exits, which
	// flatters it (its files may still be in the page cache only).
	pull := time.Since(start).Seconds()
	st := b.proxy.Stats()
	py, err := python(dir)
	if err != nil {
		return nil, err
	}
	return sample{
		"pull_s":         pull,
		"python_run_s":   py,
		"python_ready_s": pull + py,
		"bytes":          float64(st.Bytes),
		"requests":       float64(st.Requests),
	}, nil
}

// bigFile measures reading the big file: one GET of its blob, a cold
// sequential read through a fresh mount, a page-cache re-read, and after a
// server restart and a dropped page cache, a re-read served by whatever
// the tool keeps on disk; and the same bytes from local disk.
func (b *bench) bigRead(ref string, im image, local string, flags ...string) (sample, error) {
	s := sample{}
	getS, n, err := blobGet(b.proxy.URL(), im.Repo, im.Blob)
	if err != nil {
		return nil, err
	}
	s["get_s"], s["get_MBps"] = getS, float64(n)/getS/1e6

	size := float64(im.Tar)
	if st, err := os.Stat(local); err == nil {
		size = float64(st.Size())
	}
	cache, mnt, cleanup, err := b.scratch()
	if err != nil {
		return nil, err
	}
	defer cleanup()

	if _, err := b.mountDaemon(ref, cache, mnt, flags...); err != nil {
		return nil, err
	}
	b.proxy.Reset()
	b.tracer.reset()
	pid := serverPID(b.bin, mnt)
	cpu0, flt0 := cpuSeconds(pid), minorFaults(pid)
	busy0, all0 := machineCPU()
	cold, err := catFile(filepath.Join(mnt, "big.bin"))
	if err != nil {
		return nil, err
	}
	reqs := b.tracer.take()
	s["cold_requests"], s["cold_max_in_flight"] = float64(len(reqs)), float64(maxInFlight(reqs))
	s["cold_link_busy"] = busy(reqs) / cold // share of the read with a request open
	s["cold_s"], s["cold_MBps"], s["cold_bytes"] = cold, size/cold/1e6, float64(b.proxy.Stats().Bytes)
	s["cold_server_cpu_s"] = cpuSeconds(pid) - cpu0
	s["cold_server_minor_faults"] = minorFaults(pid) - flt0
	if busy1, all1 := machineCPU(); all1 > all0 {
		s["cold_machine_cpu_busy"] = (busy1 - busy0) / (all1 - all0) // share of all cores busy
	}
	page, err := catFile(filepath.Join(mnt, "big.bin"))
	if err != nil {
		return nil, err
	}
	s["page_MBps"] = size / page / 1e6
	s["peak_rss_bytes"] = peakRSS(serverPID(b.bin, mnt))
	if err := b.umount(mnt); err != nil {
		return nil, err
	}

	// Restart: a new server on the same cache dir, page cache dropped.
	if _, err := b.mountDaemon(ref, cache, mnt, flags...); err != nil {
		return nil, err
	}
	if err := dropCaches(); err != nil {
		return nil, err
	}
	b.proxy.Reset()
	pid = serverPID(b.bin, mnt)
	cpu0 = cpuSeconds(pid)
	warm, err := catFile(filepath.Join(mnt, "big.bin"))
	if err != nil {
		return nil, err
	}
	s["warm_disk_MBps"], s["warm_disk_net_bytes"] = size/warm/1e6, float64(b.proxy.Stats().Bytes)
	s["warm_disk_server_cpu_s"] = cpuSeconds(pid) - cpu0
	if rss := peakRSS(serverPID(b.bin, mnt)); rss > s["peak_rss_bytes"] {
		s["peak_rss_bytes"] = rss
	}
	if err := b.umount(mnt); err != nil {
		return nil, err
	}

	if err := dropCaches(); err != nil {
		return nil, err
	}
	ld, err := catFile(local)
	if err != nil {
		return nil, err
	}
	lp, err := catFile(local)
	if err != nil {
		return nil, err
	}
	s["local_disk_MBps"], s["local_page_MBps"] = size/ld/1e6, size/lp/1e6
	return s, nil
}

// profile records a CPU profile of the server with perf during a cold
// sequential read of the big file and returns perf's report (text).
func (b *bench) profile(ref, outDir string) (string, error) {
	if _, err := exec.LookPath("perf"); err != nil {
		return "", fmt.Errorf("perf not installed (Debian: linux-perf)")
	}
	cache, mnt, cleanup, err := b.scratch()
	if err != nil {
		return "", err
	}
	defer cleanup()
	if _, err := b.mountDaemon(ref, cache, mnt); err != nil {
		return "", err
	}
	pid := serverPID(b.bin, mnt)
	data := filepath.Join(b.work, "perf.data")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rec := exec.CommandContext(ctx, "perf", "record", "-F", "499", "-g", "-p", strconv.Itoa(pid), "-o", data)
	var recOut bytes.Buffer
	rec.Stdout, rec.Stderr = &recOut, &recOut
	rec.Cancel = func() error { return rec.Process.Signal(syscall.SIGINT) }
	if err := rec.Start(); err != nil {
		return "", err
	}
	time.Sleep(300 * time.Millisecond) // let perf attach
	_, cerr := catFile(filepath.Join(mnt, "big.bin"))
	rec.Process.Signal(syscall.SIGINT)
	rec.Wait()
	if cerr != nil {
		return "", cerr
	}
	if err := b.umount(mnt); err != nil {
		return "", err
	}
	rep, err := perfReport(data, recOut.String())
	if err != nil {
		return "", err
	}
	os.Rename(data, filepath.Join(outDir, "perf.data")) // for perf report; not committed
	return rep, nil
}

// profileMount records a CPU profile of stargz-mount --daemon from its
// start until the mount is ready (perf follows the background server it
// starts), with a fresh cache dir.
func (b *bench) profileMount(ref, outDir string) (string, error) {
	cache, mnt, cleanup, err := b.scratch()
	if err != nil {
		return "", err
	}
	defer cleanup()
	data := filepath.Join(b.work, "perf-mount.data")
	out, err := exec.Command("perf", "record", "-F", "999", "-g", "-o", data, "--",
		b.bin, "--cache-dir", cache, "--cache-max-memory", b.memory, "--daemon", ref, mnt).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("perf record stargz-mount: %v: %s", err, out)
	}
	if err := b.umount(mnt); err != nil {
		return "", err
	}
	rep, err := perfReport(data, string(out))
	if err != nil {
		return "", err
	}
	os.Rename(data, filepath.Join(outDir, "perf-mount.data"))
	return rep, nil
}

// perfReport renders a perf.data: flat first (BENCHMARKS.md quotes its
// top), then who calls the hot symbols.
func perfReport(data, recOut string) (string, error) {
	report := func(args ...string) (string, error) {
		out, err := exec.Command("perf", append([]string{"report", "-i", data, "--stdio", "--no-children"}, args...)...).Output()
		if err != nil {
			return "", fmt.Errorf("perf report: %v (%s)", err, recOut)
		}
		var keep []string
		for _, l := range strings.Split(string(out), "\n") {
			l = strings.TrimRight(l, " ")
			if l != "" && l != "#" && !strings.Contains(l, "Tip:") && !strings.Contains(l, "header info") && !strings.HasPrefix(l, "# ....") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n") + "\n", nil
	}
	var sb strings.Builder
	for _, sec := range []struct {
		title string
		args  []string
	}{
		{sectionSelf, []string{"-F", "overhead,comm,dso,sym", "--percent-limit", "1", "-g", "none"}},
		{sectionInclusive, []string{"--children", "--sort", "sym", "--percent-limit", "4", "-g", "none"}},
		{sectionChains, []string{"--sort", "symbol", "--percent-limit", "3", "-g", "caller,2,callee", "--max-stack", "14"}},
	} {
		out, err := report(sec.args...)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&sb, "%s\n%s\n", sec.title, out)
	}
	return sb.String(), nil
}

// Section titles of a perfReport.
const (
	sectionSelf      = "=== self time (where the CPU is) ==="
	sectionInclusive = "=== inclusive time (what it is spent under) ==="
	sectionChains    = "=== call chains of the entries above 3 % ==="
)

// perfSection returns up to n lines of one section of a perfReport,
// without perf's # header lines; with only, just the lines holding one of
// those strings (and the headers).
func perfSection(report, title string, n int, only ...string) string {
	_, rest, ok := strings.Cut(report, title+"\n")
	if !ok {
		return strings.TrimSpace(report) + "\n" // an error message, or an old report
	}
	var keep []string
	for _, l := range strings.Split(rest, "\n") {
		if strings.HasPrefix(l, "=== ") || len(keep) >= n {
			break
		}
		header := strings.HasPrefix(l, "# Samples") || strings.HasPrefix(l, "# Overhead") || strings.HasPrefix(l, "# Children")
		if l == "" || strings.HasPrefix(l, "#") && !header {
			continue
		}
		wanted := header || len(only) == 0
		for _, o := range only {
			wanted = wanted || strings.Contains(l, o)
		}
		if wanted {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n") + "\n"
}

// scratch makes a fresh cache dir and the mount point for one measurement;
// cleanup unmounts whatever is left at the mount point and removes the
// cache dir.
func (b *bench) scratch() (cache, mnt string, cleanup func(), err error) {
	cache, err = os.MkdirTemp(b.work, "c")
	if err != nil {
		return "", "", nil, err
	}
	mnt = filepath.Join(b.work, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		os.RemoveAll(cache)
		return "", "", nil, err
	}
	return cache, mnt, func() {
		cleanupMounts(b.bin, mnt)
		os.RemoveAll(cache)
	}, nil
}
