package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"html"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// results is what a run found; results.json holds it.
type results struct {
	Date     string               `json:"date"`
	Commit   string               `json:"commit"`
	Settings settings             `json:"settings"`
	Machine  machineInfo          `json:"machine"`
	Images   map[string]image     `json:"images"`
	Prio     []string             `json:"prioritized_files"`
	Medians  map[string]sample    `json:"medians"`
	Targets  []target             `json:"targets"`
	Failures map[string]string    `json:"failures,omitempty"`
	Samples  map[string][]sample  `json:"samples"`
	Traces   map[string][]request `json:"traces"` // requests of the last cold python3 run per image
}

type machineInfo struct {
	CPU       string  `json:"cpu"`
	Cores     int     `json:"cores"`
	Kernel    string  `json:"kernel"`
	MemoryGiB float64 `json:"memory_gib"`
	LoadStart string  `json:"loadavg_at_start"`
	LoadEnd   string  `json:"loadavg_at_end"`
}

func machine() machineInfo {
	m := machineInfo{Cores: runtime.NumCPU(), LoadStart: loadavg()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		m.MemoryGiB = math.Round(float64(si.Totalram)*float64(si.Unit)/(1<<30)*10) / 10
	}
	return m
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// target is one of issue 9's goals and where this run stands.
type target struct {
	Name   string  `json:"name"`
	Figure string  `json:"figure"` // the two figures compared
	Ratio  float64 `json:"ratio"`
	Goal   string  `json:"goal"`
	Met    bool    `json:"met"`
}

func targets(r *results, memory string) []target {
	pull, prio, plain, big := r.Medians["full-pull"], r.Medians["estargz-prio"], r.Medians["estargz"], r.Medians["big"]
	var ts []target
	ratio := func(a, b float64) float64 {
		if b == 0 {
			return math.NaN()
		}
		return a / b
	}
	for _, c := range []struct {
		label string
		s     sample
	}{{"prioritized eStargz", prio}, {"eStargz", plain}} {
		q := ratio(c.s["python_ready_s"], pull["python_ready_s"])
		ts = append(ts, target{Name: "python3 ready, " + c.label + " / full pull",
			Figure: fmt.Sprintf("%.2f s / %.2f s", c.s["python_ready_s"], pull["python_ready_s"]),
			Ratio:  q, Goal: "≤ 25 %", Met: q <= 0.25})
	}
	for _, c := range []struct {
		label string
		s     sample
	}{{"prioritized eStargz", prio}, {"eStargz", plain}} {
		q := ratio(c.s["bytes"], pull["bytes"])
		ts = append(ts, target{Name: "bytes fetched, " + c.label + " / full pull",
			Figure: fmt.Sprintf("%s / %s", mib(c.s["bytes"]), mib(pull["bytes"])),
			Ratio:  q, Goal: "≤ 15 %", Met: q <= 0.15})
	}
	q := ratio(big["cold_MBps"], big["get_MBps"])
	ts = append(ts, target{Name: "cold sequential read / one GET of the blob",
		Figure: fmt.Sprintf("%.0f MB/s / %.0f MB/s", big["cold_MBps"], big["get_MBps"]),
		Ratio:  q, Goal: "≥ 90 %", Met: q >= 0.90})
	q = ratio(big["warm_disk_MBps"], big["local_disk_MBps"])
	ts = append(ts, target{Name: "warm re-read after restart (disk cache) / local disk",
		Figure: fmt.Sprintf("%.0f MB/s / %.0f MB/s", big["warm_disk_MBps"], big["local_disk_MBps"]),
		Ratio:  q, Goal: "≥ 50 %", Met: q >= 0.50})
	budget, _ := parseRate(memory)
	rss := math.Max(math.Max(prio["peak_rss_bytes"], plain["peak_rss_bytes"]), big["peak_rss_bytes"])
	limit := float64(budget) + 64<<20
	ts = append(ts, target{Name: "server peak RSS / (memory budget + 64 MiB)",
		Figure: fmt.Sprintf("%s / %s", mib(rss), mib(limit)),
		Ratio:  ratio(rss, limit), Goal: "≤ 100 %", Met: rss <= limit})
	return ts
}

func mib(b float64) string { return fmt.Sprintf("%.1f MiB", b/(1<<20)) }

func pct(q float64) string {
	if math.IsNaN(q) {
		return "n/a"
	}
	return fmt.Sprintf("%.1f %%", q*100)
}

// profiles are perf reports of the server: during a cold sequential read
// of the big file, and from the start of the mount command until ready.
type profiles struct{ Read, Mount string }

// write prints the table and writes results.json, chart.svg, profile.txt,
// profile-mount.txt and BENCHMARKS.md.
func (r *results) write(outDir, mdPath string, profs profiles) error {
	if r.Machine.LoadEnd == "" {
		r.Machine.LoadEnd = loadavg()
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"results.json":      append(js, '\n'),
		"chart.svg":         []byte(r.chart()),
		"profile.txt":       []byte(profs.Read),
		"profile-mount.txt": []byte(profs.Mount),
	}
	for name, b := range files {
		if err := writeFile(filepath.Join(outDir, name), b); err != nil {
			return err
		}
	}
	fmt.Print(r.figures())
	fmt.Println()
	fmt.Print(r.targetTable())
	if mdPath == "" {
		return nil
	}
	rel, err := filepath.Rel(filepath.Dir(mdPath), outDir)
	if err != nil {
		rel = outDir
	}
	notes, _ := os.ReadFile("bench/notes.md")
	return writeFile(mdPath, []byte(r.markdown(filepath.ToSlash(rel), profs, string(notes))))
}

// writeFile writes through a temp file and a rename.
func writeFile(p string, b []byte) error {
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// figures is the Markdown table of median figures per case.
func (r *results) figures() string {
	m := r.Medians
	var sb strings.Builder
	row := func(cells ...string) { fmt.Fprintf(&sb, "| %s |\n", strings.Join(cells, " | ")) }
	row("python3 image, from cold", "until ready", "python3 -c 'print(1)' finished", "fetched", "requests", "server peak RSS", "python3 again, warm")
	row("---", "---:", "---:", "---:", "---:", "---:", "---:")
	p := m["full-pull"]
	row("full pull (GET every blob, gunzip + untar to disk)", fmt.Sprintf("%.2f s", p["pull_s"]),
		fmt.Sprintf("%.2f s", p["python_ready_s"]), mib(p["bytes"]), fmt.Sprintf("%.0f", p["requests"]), "",
		fmt.Sprintf("%.2f s (first run)", p["python_run_s"]))
	for _, c := range []struct{ key, label string }{
		{"gzip", "stargz-mount, plain gzip"},
		{"estargz", "stargz-mount, eStargz"},
		{"estargz-prio", "stargz-mount, eStargz with prioritized files"},
	} {
		s, ok := m[c.key]
		if !ok {
			msg := r.Failures[c.key]
			if i := strings.LastIndex(msg, ": "); i >= 0 {
				msg = msg[i+2:]
			}
			row(c.label, "fails: "+strings.ReplaceAll(msg, "|", "\\|"), "", "", "", "", "")
			continue
		}
		row(c.label, fmt.Sprintf("%.2f s", s["mount_ready_s"]), fmt.Sprintf("%.2f s", s["python_ready_s"]),
			mib(s["bytes"]), fmt.Sprintf("%.0f", s["requests"]), mib(s["peak_rss_bytes"]), fmt.Sprintf("%.2f s", s["python_warm_s"]))
	}
	b := m["big"]
	sb.WriteString("\n")
	row(fmt.Sprintf("%d MiB random file", r.Settings.BigSize>>20), "MB/s", "note")
	row("---", "---:", "---")
	row("one GET of its blob through the proxy", fmt.Sprintf("%.0f", b["get_MBps"]), "")
	row("stargz-mount, cold sequential read (cat)", fmt.Sprintf("%.0f", b["cold_MBps"]),
		fmt.Sprintf("fresh cache dir, fetched %s in %.0f requests (at most %.0f in flight), %.1f s, server CPU %.2f s",
			mib(b["cold_bytes"]), b["cold_requests"], b["cold_max_in_flight"], b["cold_s"], b["cold_server_cpu_s"]))
	row("stargz-mount, re-read after a server restart, page cache dropped", fmt.Sprintf("%.0f", b["warm_disk_MBps"]),
		fmt.Sprintf("fetched %s again from the registry, server CPU %.2f s", mib(b["warm_disk_net_bytes"]), b["warm_disk_server_cpu_s"]))
	row("local disk, cat, page cache dropped", fmt.Sprintf("%.0f", b["local_disk_MBps"]), "")
	row("stargz-mount, re-read from the page cache", fmt.Sprintf("%.0f", b["page_MBps"]), "")
	row("local disk, re-read from the page cache", fmt.Sprintf("%.0f", b["local_page_MBps"]), "")
	row("server peak RSS while reading it", mib(b["peak_rss_bytes"]), "--cache-max-memory "+r.Settings.Memory)
	return sb.String()
}

func (r *results) targetTable() string {
	var sb strings.Builder
	sb.WriteString("| target (issue 9) | figures | ratio | goal | met |\n| --- | ---: | ---: | --- | --- |\n")
	for _, t := range r.Targets {
		met := "no"
		if t.Met {
			met = "yes"
		}
		fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s |\n", t.Name, t.Figure, pct(t.Ratio), t.Goal, met)
	}
	return sb.String()
}

func (r *results) markdown(rel string, profs profiles, notes string) string {
	var sb strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&sb, format, a...) }
	s, mc := r.Settings, r.Machine
	w("# Benchmarks\n\n")
	w("Generated by `make bench` (`go run ./bench`) on %s from commit `%s`; do not edit by hand\n", r.Date, r.Commit)
	w("(the notes at the end come from `bench/notes.md`). Figures are medians of %d interleaved runs;\n", s.Runs)
	w("every run measures every case. Raw samples: [%s/results.json](%s/results.json).\n\n", rel, rel)
	w("![python3 ready and read throughput](%s/chart.svg)\n\n", rel)
	w("## Setup\n\n")
	w("- Machine: %s, %d cores, %.1f GiB, Linux %s. Load average %s at start, %s at end",
		mc.CPU, mc.Cores, mc.MemoryGiB, mc.Kernel, mc.LoadStart, mc.LoadEnd)
	w(" (a shared machine: other work ran alongside, so figures are noisy).\n")
	w("- Link: Debian's docker-registry on loopback behind `internal/netshape`: %s added to every request,\n", s.Delay)
	w("  %s shared by all connections. Pushes go to the registry directly; every read goes through the proxy,\n", s.Bandwidth)
	w("  which counts requests and response bytes.\n")
	w("- python3 image: Debian bookworm `debootstrap --variant=minbase --include=python3-minimal` from\n")
	w("  %s, apt caches removed, one layer, pushed three ways:\n", s.Mirror)
	for _, k := range []string{"gzip", "estargz", "estargz-prio"} {
		im := r.Images[k]
		w("  - %s: %s compressed (%s tar)\n", im.Format, mib(float64(im.Compressed)), mib(float64(im.Tar)))
	}
	w("\n  The %d prioritized files were recorded with `strace -f -e trace=file` of\n", r.Images["estargz-prio"].Prioritized)
	w("  `chroot ROOTFS python3 -c 'print(1)'` (opened or executed regular files, symlinks resolved, plus the ELF\n")
	w("  interpreter). eStargz layers are built with the estargz library's defaults (4 MiB chunks, gzip).\n")
	w("- Big-file image: one %d MiB random file, eStargz, %s compressed.\n", s.BigSize>>20, mib(float64(r.Images["big"].Compressed)))
	w("- stargz-mount built from the working tree, `--daemon --cache-max-memory %s`, a fresh `--cache-dir` per cold case.\n", s.Memory)
	w("- Full pull (the baseline): go-containerregistry resolves the image and GETs each layer blob through the\n")
	w("  proxy, streaming it into GNU `tar -xz` (gunzip and unpack overlap the download; no `sync` afterwards,\n")
	w("  which flatters the baseline); python3 then runs chrooted in the result. \"python3 ready\" is pull + run\n")
	w("  for it, mount + run for stargz-mount (each from the start of the command to python3's exit).\n")
	w("- Warm re-read: unmount (the server exits, its memory cache goes), mount again on the same cache dir,\n")
	w("  drop the page cache (`echo 1 > /proc/sys/vm/drop_caches`), `cat` the file. Local disk: `cat` of the same\n")
	w("  bytes from a file in /var/tmp after dropping the page cache.\n\n")
	w("## Figures\n\n%s\n", r.figures())
	w("## Against the targets of issue 9\n\n%s\n", r.targetTable())
	if len(r.Failures) > 0 {
		w("Cases that failed in some run:\n\n")
		keys := make([]string, 0, len(r.Failures))
		for k := range r.Failures {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			w("- %s: `%s`\n", k, r.Failures[k])
		}
		w("\n")
	}
	if tr := r.Traces["estargz-prio"]; len(tr) > 0 {
		pm := r.Medians["estargz-prio"]
		w("## Requests of one cold python3 run\n\n")
		w("Prioritized eStargz, last round, as the registry saw them behind the proxy (so after the %s delay;\n", s.Delay)
		w("\"took\" ends when the last byte left for the proxy). Median over the rounds: %.0f requests after the\n", pm["python_requests"])
		w("mount was ready, at most %.0f in flight at once; the server used %.2f s of CPU during the %.2f s run,\n", pm["python_max_in_flight"], pm["python_server_cpu_s"], pm["python_run_s"])
		w("and the same run warm takes %.2f s.\n\n", pm["python_warm_s"])
		w("%s\n", timeline(tr))
	}
	w("## Profiles\n\n")
	w("CPU profiles taken with perf after the measured runs; the reports (self time, inclusive time, call\n")
	w("chains) are [%s/profile.txt](%s/profile.txt) and [%s/profile-mount.txt](%s/profile-mount.txt).\n\n", rel, rel, rel, rel)
	w("The server during one cold sequential read of the big file (`perf record -F 499 -g -p PID`), self time:\n\n")
	w("```\n%s```\n\n", perfSection(profs.Read, sectionSelf, 14))
	w("`stargz-mount --daemon` of the prioritized python3 image, from the command's start until the mount is ready\n")
	w("(`perf record -F 999 -g -- stargz-mount ...`, which follows the background server it starts), inclusive time:\n\n")
	w("```\n%s```\n\n", perfSection(profs.Mount, sectionInclusive, 26))
	if notes != "" {
		w("## Notes\n\n%s", notes)
	}
	w("\n## Reproduce\n\n    make bench          # as root; installs debootstrap and strace with make bench-deps if missing\n")
	w("    go run ./bench --delay %s --bandwidth %s --runs %d --out bench/results\n", s.Delay, s.Bandwidth, s.Runs)
	return sb.String()
}

// chart draws two panels: python3 ready (stacked: until ready, then the
// python3 run) and read throughput of the big file.
func (r *results) chart() string {
	type seg struct {
		v     float64
		color string
	}
	type bar struct {
		label string
		segs  []seg
		text  string
	}
	m := r.Medians
	const ready, runC, tp = "#4477aa", "#ee6677", "#228833"
	var py []bar
	p := m["full-pull"]
	py = append(py, bar{"full pull + python3", []seg{{p["pull_s"], ready}, {p["python_run_s"], runC}},
		fmt.Sprintf("%.2f s, %s", p["python_ready_s"], mib(p["bytes"]))})
	for _, c := range []struct{ key, label string }{{"estargz", "eStargz"}, {"estargz-prio", "eStargz, prioritized"}} {
		s := m[c.key]
		py = append(py, bar{"stargz-mount, " + c.label, []seg{{s["mount_ready_s"], ready}, {s["python_run_s"], runC}},
			fmt.Sprintf("%.2f s, %s", s["python_ready_s"], mib(s["bytes"]))})
	}
	b := m["big"]
	var rd []bar
	for _, c := range []struct {
		label string
		key   string
	}{
		{"one GET of the blob", "get_MBps"},
		{"stargz-mount, cold sequential", "cold_MBps"},
		{"stargz-mount, restarted (disk cache)", "warm_disk_MBps"},
		{"local disk, cold", "local_disk_MBps"},
		{"stargz-mount, page cache", "page_MBps"},
		{"local disk, page cache", "local_page_MBps"},
	} {
		rd = append(rd, bar{c.label, []seg{{b[c.key], tp}}, fmt.Sprintf("%.0f MB/s", b[c.key])})
	}

	const W, labelW, barW, rowH = 790, 260, 400, 26
	var sb strings.Builder
	y := 0
	panel := func(title string, bars []bar, logScale bool, mark float64, markLabel string) {
		y += 28
		fmt.Fprintf(&sb, `<text x="10" y="%d" font-size="15" font-weight="bold">%s</text>`+"\n", y, html.EscapeString(title))
		y += 10
		top := y
		max := 0.0
		for _, br := range bars {
			t := 0.0
			for _, s := range br.segs {
				t += s.v
			}
			max = math.Max(max, t)
		}
		scale := func(v float64) float64 {
			if max <= 0 {
				return 0
			}
			if logScale {
				return math.Log10(1+v) / math.Log10(1+max) * barW
			}
			return v / max * barW
		}
		for _, br := range bars {
			fmt.Fprintf(&sb, `<text x="%d" y="%d" font-size="12" text-anchor="end">%s</text>`+"\n", labelW-6, y+17, html.EscapeString(br.label))
			x, acc := float64(labelW), 0.0
			for _, s := range br.segs {
				x0 := labelW + scale(acc)
				acc += s.v
				x = labelW + scale(acc)
				fmt.Fprintf(&sb, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", x0, y+4, math.Max(x-x0, 0.5), rowH-8, s.color)
			}
			fmt.Fprintf(&sb, `<text x="%.1f" y="%d" font-size="12">%s</text>`+"\n", x+6, y+17, html.EscapeString(br.text))
			y += rowH
		}
		if mark > 0 {
			mx := labelW + scale(mark)
			fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333" stroke-dasharray="4 3"/>`+"\n", mx, top, mx, y+4)
			fmt.Fprintf(&sb, `<text x="%.1f" y="%d" font-size="11" fill="#333">%s</text>`+"\n", mx+3, y+14, html.EscapeString(markLabel))
			y += 16
		}
	}
	panel("Until python3 -c 'print(1)' finished, from cold (median)", py, false, p["python_ready_s"]/4, "target: 25 % of full pull")
	fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d" font-size="12">until ready (pull+unpack / mount)</text>`+"\n", labelW, y+4, ready, labelW+16, y+14)
	fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d" font-size="12">python3 run</text>`+"\n", labelW+250, y+4, runC, labelW+266, y+14)
	y += 22
	panel(fmt.Sprintf("Reading the %d MiB random file, MB/s (median, log scale)", r.Settings.BigSize>>20), rd, true, 0, "")
	y += 8
	fmt.Fprintf(&sb, `<text x="10" y="%d" font-size="11" fill="#555">link: %s per request, %s; %s, %d cores; %s</text>`+"\n",
		y+10, html.EscapeString(r.Settings.Delay), html.EscapeString(r.Settings.Bandwidth), html.EscapeString(r.Machine.CPU), r.Machine.Cores, r.Date)
	y += 20
	return fmt.Sprintf(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif">
<rect width="100%%" height="100%%" fill="white"/>
%s</svg>
`, W, y, W, y, sb.String())
}
