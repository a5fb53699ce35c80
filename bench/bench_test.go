package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  bool
	}{
		{"100MB/s", 100e6, false},
		{"12.5MiB/s", 12.5 * (1 << 20), false},
		{"256MiB", 256 << 20, false},
		{"1e8", 1e8, false},
		{"0", 0, false},
		{"fast", 0, true},
		{"-1MB/s", 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseRate(tc.in)
			if (err != nil) != tc.err || got != tc.want {
				t.Errorf("parseRate(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
			}
		})
	}
}

func TestResolveIn(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"usr/bin", "usr/lib64", "etc"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"usr/bin/python3.11", "usr/lib64/ld.so", "etc/passwd"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	links := map[string]string{
		"usr/bin/python3": "python3.11",  // relative
		"lib64":           "usr/lib64",   // relative at the root
		"bin":             "/usr/bin",    // absolute: must stay inside root
		"usr/bin/escape":  "../../../..", // climbs past the root: clamps to it
		"loop":            "loop",
	}
	for l, target := range links {
		if err := os.Symlink(target, filepath.Join(root, l)); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"/usr/bin/python3", "usr/bin/python3.11", true},
		{"/bin/python3", "usr/bin/python3.11", true},
		{"/lib64/ld.so", "usr/lib64/ld.so", true},
		{"/usr/bin/escape/etc/passwd", "etc/passwd", true},
		{"/etc/../etc/./passwd", "etc/passwd", true},
		{"/missing", "", false},
		{"/loop", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, ok := resolveIn(root, tc.in)
			if got != tc.want || ok != tc.ok {
				t.Errorf("resolveIn(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestMedians(t *testing.T) {
	got := medians([]sample{{"a": 3, "b": 1}, {"a": 1, "b": 2}, {"a": 2}})
	if got["a"] != 2 || got["b"] != 1.5 {
		t.Errorf("medians = %v; want a=2 (odd count), b=1.5 (even count)", got)
	}
}

func TestChartAndMarkdown(t *testing.T) {
	r := &results{
		Settings: settings{Delay: "30ms", Bandwidth: "100MB/s", Runs: 1, Memory: "256MiB", BigSize: 256 << 20},
		Images:   map[string]image{"estargz-prio": {Prioritized: 14}},
		Medians: map[string]sample{
			"full-pull":    {"pull_s": 3, "python_run_s": 0.2, "python_ready_s": 3.2, "bytes": 100 << 20},
			"estargz":      {"mount_ready_s": 0.5, "python_run_s": 1, "python_ready_s": 1.5, "bytes": 5 << 20, "peak_rss_bytes": 50 << 20},
			"estargz-prio": {"mount_ready_s": 0.5, "python_run_s": 0.3, "python_ready_s": 0.8, "bytes": 5 << 20, "peak_rss_bytes": 50 << 20},
			"big":          {"get_MBps": 97, "cold_MBps": 90, "warm_disk_MBps": 600, "local_disk_MBps": 1000, "peak_rss_bytes": 400 << 20},
		},
		Failures: map[string]string{"gzip": "stargz-mount x: exit status 1: not eStargz"},
	}
	r.Targets = targets(r, "256MiB")
	met := map[string]bool{}
	for _, tg := range r.Targets {
		met[tg.Name] = tg.Met
	}
	want := map[string]bool{
		"python3 ready, prioritized eStargz / full pull":       true,  // 25 %
		"python3 ready, eStargz / full pull":                   false, // 47 %
		"bytes fetched, prioritized eStargz / full pull":       true,
		"cold sequential read / one GET of the blob":           true,
		"warm re-read after restart (disk cache) / local disk": true,
		"server peak RSS / (memory budget + 64 MiB)":           false, // 400 > 320
	}
	for name, w := range want {
		if got, ok := met[name]; !ok || got != w {
			t.Errorf("target %q met = %v (present %v); want %v", name, got, ok, w)
		}
	}
	svg := r.chart()
	if !strings.HasPrefix(svg, "<svg") || strings.Count(svg, "<rect") < 12 {
		t.Errorf("chart has no bars:\n%s", svg)
	}
	md := r.markdown("bench/results", profiles{Read: "profile\n"}, "")
	for _, s := range []string{"bench/results/chart.svg", "fails: not eStargz", "| no |", "14 prioritized files"} {
		if !strings.Contains(md, s) {
			t.Errorf("BENCHMARKS.md lacks %q", s)
		}
	}
}

func TestMaxInFlight(t *testing.T) {
	tests := []struct {
		name string
		reqs []request
		want int
	}{
		{"none", nil, 0},
		{"serial", []request{{Start: 0, End: 1}, {Start: 1, End: 2}, {Start: 2.5, End: 3}}, 1},
		{"two overlap", []request{{Start: 0, End: 2}, {Start: 1, End: 3}, {Start: 3, End: 4}}, 2},
		{"three at once", []request{{Start: 0, End: 5}, {Start: 1, End: 5}, {Start: 2, End: 5}}, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := maxInFlight(tc.reqs); got != tc.want {
				t.Errorf("maxInFlight = %d; want %d", got, tc.want)
			}
		})
	}
}

func TestPerfSection(t *testing.T) {
	rep := sectionSelf + "\n# Samples: 10\n# comment\n 50% a\n 40% b\n 10% c\n\n" + sectionInclusive + "\n 90% main\n"
	tests := []struct {
		title string
		n     int
		want  string
	}{
		{sectionSelf, 10, "# Samples: 10\n 50% a\n 40% b\n 10% c\n"},
		{sectionSelf, 2, "# Samples: 10\n 50% a\n"},
		{sectionInclusive, 10, " 90% main\n"},
		{sectionChains, 10, strings.TrimSpace(rep) + "\n"}, // missing: the whole text
	}
	for _, tc := range tests {
		t.Run(tc.title, func(t *testing.T) {
			if got := perfSection(rep, tc.title, tc.n); got != tc.want {
				t.Errorf("perfSection = %q; want %q", got, tc.want)
			}
		})
	}
}
