// Command bench measures stargz-mount against a full pull on a shaped
// link: it starts Debian's docker-registry on loopback behind a shaping
// proxy (internal/netshape), builds and pushes a Debian python3 rootfs (as
// plain gzip, eStargz, and eStargz with the files python3 reads
// prioritized) and a 256 MiB random-file image, then measures every case in
// the same run, interleaved, N times, and writes results.json, chart.svg,
// profile.txt and BENCHMARKS.md. Run it as root from the repository root:
//
//	go run ./bench --delay 30ms --bandwidth 100MB/s --runs 3
//
// or make bench. It builds stargz-mount from the working tree.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/stargz-mount/stargz-mount/internal/netshape"
)

func main() {
	if err := mainErr(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// settings are the flags, kept in the results.
type settings struct {
	Delay     string `json:"delay"`
	Bandwidth string `json:"bandwidth"`
	Runs      int    `json:"runs"`
	Memory    string `json:"cache_max_memory"`
	BigSize   int64  `json:"big_file_bytes"`
	Mirror    string `json:"debian_mirror"`
}

func mainErr() error {
	delay := flag.Duration("delay", 30*time.Millisecond, "delay added to every request by the proxy")
	bandwidth := flag.String("bandwidth", "100MB/s", "bandwidth cap of the proxy, shared by all connections (bytes/s; units kB, MB, GB, KiB, MiB, GiB; 0: none)")
	runs := flag.Int("runs", 3, "interleaved runs of every case; figures are medians")
	out := flag.String("out", "bench/results", "`DIR` for results.json, chart.svg and profile.txt")
	md := flag.String("md", "BENCHMARKS.md", "BENCHMARKS.md to regenerate (empty: none)")
	cacheDir := flag.String("cache", "/var/cache/stargz-mount-bench", "`DIR` keeping the debootstrapped rootfs between runs")
	memory := flag.String("memory", "256MiB", "--cache-max-memory given to stargz-mount: the memory budget the RSS target is checked against")
	bigMiB := flag.Int64("big-mib", 256, "size of the big random file in MiB")
	only := flag.String("cases", "", "comma-separated `NAMES` of the cases to measure (default: all; a partial run prints its medians and writes nothing; full-pull, gzip, estargz, estargz-prio, big, estargz-prio-nobg, big-nobg)")
	perfRead := flag.Bool("perf", false, "with --cases: also profile the server during a cold read of the big file, and stargz-mount --daemon mounting the python3 image, and print the reports")
	rewrite := flag.Bool("rewrite", false, "measure nothing: regenerate chart.svg and BENCHMARKS.md from DIR/results.json (after editing bench/notes.md)")
	flag.Parse()

	if *rewrite {
		return rewriteReport(*out, *md)
	}

	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (FUSE, overlayfs, chroot, drop_caches)")
	}
	if _, err := os.Stat("go.mod"); err != nil {
		return fmt.Errorf("run from the repository root: %w", err)
	}
	bw, err := parseRate(*bandwidth)
	if err != nil {
		return fmt.Errorf("--bandwidth: %w", err)
	}
	set := settings{Delay: delay.String(), Bandwidth: *bandwidth, Runs: *runs, Memory: *memory,
		BigSize: *bigMiB << 20, Mirror: debianMirror()}
	mach := machine()

	if err := os.MkdirAll(*cacheDir, 0o755); err != nil {
		return err
	}
	work, err := os.MkdirTemp("/var/tmp", "sgz-bench")
	if err != nil {
		return err
	}
	b := &bench{work: work, memory: *memory, bin: filepath.Join(work, "stargz-mount")}
	defer os.RemoveAll(work)
	defer cleanupMounts(b.bin, work)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		cleanupMounts(b.bin, work)
		os.RemoveAll(work)
		os.Exit(130)
	}()

	slog.Info("building stargz-mount from the working tree")
	if err := run("go", "build", "-o", b.bin, "."); err != nil {
		return err
	}
	commit, _ := exec.Command("git", "describe", "--always", "--dirty").Output()

	rootfs, err := rootfsDir(*cacheDir, set.Mirror)
	if err != nil {
		return err
	}
	regDir := filepath.Join(work, "registry")
	os.MkdirAll(regDir, 0o755)
	reg, err := startRegistry(regDir)
	if err != nil {
		return err
	}
	defer reg.stop()
	bi, err := buildImages(reg.addr, rootfs, *cacheDir, set.BigSize, b.recordWithTool)
	if err != nil {
		return err
	}
	imgs := bi.imgs
	local := filepath.Join(work, "big.bin")
	if err := os.WriteFile(local, bi.big, 0o644); err != nil {
		return err
	}
	bi.big = nil

	b.tracer, err = newTracer(reg.addr)
	if err != nil {
		return err
	}
	defer b.tracer.close()
	b.traces = map[string][]request{}
	b.proxy, err = netshape.New(b.tracer.addr(), netshape.WithDelay(*delay), netshape.WithBandwidth(bw))
	if err != nil {
		return err
	}
	defer b.proxy.Close()
	ref := func(key string) string { return b.proxy.Addr() + "/" + imgs[key].Repo }

	// Every case once per run, in an order that rotates between runs, so
	// drift on a shared machine spreads over all cases.
	type kase struct {
		name string
		run  func() (sample, error)
	}
	cases := []kase{
		{"full-pull", func() (sample, error) { return b.fullPull(ref("gzip")) }},
		{"gzip", func() (sample, error) { return b.mountPython("gzip", ref("gzip")) }},
		{"estargz", func() (sample, error) { return b.mountPython("estargz", ref("estargz")) }},
		{"estargz-prio", func() (sample, error) { return b.mountPython("estargz-prio", ref("estargz-prio")) }},
		{"big", func() (sample, error) { return b.bigRead(ref("big"), imgs["big"], local) }},
	}
	if b.supports("--background-fetch") {
		// The default fetches the rest of each layer once the mount is
		// ready; without it, the bytes are what python3 needed.
		cases = append(cases, kase{"estargz-prio-nobg", func() (sample, error) {
			return b.mountPython("estargz-prio-nobg", ref("estargz-prio"), "--background-fetch=false")
		}}, kase{"big-nobg", func() (sample, error) {
			return b.bigRead(ref("big"), imgs["big"], local, "--background-fetch=false")
		}})
	}
	if *only != "" {
		want := map[string]bool{}
		for _, n := range strings.Split(*only, ",") {
			want[strings.TrimSpace(n)] = true
		}
		kept := cases[:0]
		for _, c := range cases {
			if want[c.name] {
				kept = append(kept, c)
				delete(want, c.name)
			}
		}
		if len(want) > 0 {
			return fmt.Errorf("--cases: no case named %v", want)
		}
		cases = kept
	}
	samples := map[string][]sample{}
	failures := map[string]string{}
	for i := range *runs {
		for j := range cases {
			c := cases[(i+j)%len(cases)]
			slog.Info("measuring", "run", i+1, "case", c.name)
			s, err := c.run()
			if err != nil {
				// A case the binary cannot do (a plain gzip layer) is a
				// result, not a failure of the harness.
				slog.Warn("case failed", "case", c.name, "err", err)
				failures[c.name] = strings.ReplaceAll(err.Error(), b.proxy.Addr(), "PROXY")
				continue
			}
			samples[c.name] = append(samples[c.name], s)
		}
	}
	if *only != "" {
		// A partial run is for trying a change: its medians are printed,
		// not written over a whole run's results.
		for _, c := range cases {
			fmt.Printf("%s:", c.name)
			m := medians(samples[c.name])
			for _, k := range slices.Sorted(maps.Keys(m)) {
				fmt.Printf(" %s=%.4g", k, m[k])
			}
			fmt.Println()
		}
		if *perfRead {
			rep, err := b.profile(ref("big"), b.work)
			if err != nil {
				return err
			}
			fmt.Print(rep)
			if rep, err = b.profileMount(ref("estargz-prio"), b.work); err != nil {
				return err
			}
			fmt.Print("\n=== mounting the python3 image ===\n", rep)
		}
		return nil
	}
	for _, must := range []string{"full-pull", "estargz", "estargz-prio", "big"} {
		if len(samples[must]) == 0 {
			return fmt.Errorf("case %s never succeeded: %s", must, failures[must])
		}
	}

	slog.Info("profiling the server during a cold sequential read")
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	var profs profiles
	if profs.Read, err = b.profile(ref("big"), *out); err != nil {
		profs.Read = "no profile: " + err.Error() + "\n"
	}
	slog.Info("profiling stargz-mount --daemon until the python3 mount is ready")
	if profs.Mount, err = b.profileMount(ref("estargz-prio"), *out); err != nil {
		profs.Mount = "no profile: " + err.Error() + "\n"
	}

	res := &results{
		Date:     time.Now().UTC().Format(time.RFC3339),
		Commit:   strings.TrimSpace(string(commit)),
		Settings: set,
		Machine:  mach,
		Images:   imgs,
		Prio:     bi.prio,
		PrioBy:   bi.prioBy,
		Failures: failures,
		Medians:  map[string]sample{},
		Samples:  samples,
		Traces:   b.traces,
	}
	for name, ss := range samples {
		res.Medians[name] = medians(ss)
	}
	res.Targets = targets(res, *memory)
	return res.write(*out, *md, profs)
}

// rewriteReport regenerates the chart and BENCHMARKS.md from a saved run.
func rewriteReport(outDir, mdPath string) error {
	b, err := os.ReadFile(filepath.Join(outDir, "results.json"))
	if err != nil {
		return err
	}
	var r results
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("%s/results.json: %w", outDir, err)
	}
	r.Targets = targets(&r, r.Settings.Memory)
	read, _ := os.ReadFile(filepath.Join(outDir, "profile.txt"))
	mount, _ := os.ReadFile(filepath.Join(outDir, "profile-mount.txt"))
	return r.write(outDir, mdPath, profiles{Read: string(read), Mount: string(mount)})
}

// medians returns, per metric, the median over samples.
func medians(ss []sample) sample {
	vals := map[string][]float64{}
	for _, s := range ss {
		for k, v := range s {
			vals[k] = append(vals[k], v)
		}
	}
	m := sample{}
	for k, v := range vals {
		slices.Sort(v)
		if n := len(v); n%2 == 1 {
			m[k] = v[n/2]
		} else {
			m[k] = (v[n/2-1] + v[n/2]) / 2
		}
	}
	return m
}

// parseRate parses "100MB/s", "12.5MiB", "1e8".
func parseRate(s string) (int64, error) {
	s = strings.TrimSuffix(strings.TrimSpace(s), "/s")
	units := []struct {
		suffix string
		mult   float64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"kB", 1e3}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}
	mult := 1.0
	for _, u := range units {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = rest, u.mult
			break
		}
	}
	var v float64
	if _, err := fmt.Sscan(s, &v); err != nil || v < 0 {
		return 0, fmt.Errorf("not a rate: %q", s)
	}
	return int64(v * mult), nil
}
