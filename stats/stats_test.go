package stats

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var snap = Snapshot{Ref: "r/x@sha256:1", Mountpoint: "/mnt/a", Layers: []Layer{
	{Digest: "sha256:aa", TotalBytes: 100, FetchedBytes: 40, Requests: 3, Background: "running"},
	{Digest: "sha256:bb", TotalBytes: 10, FetchedBytes: 10, Complete: true, Background: "done"},
}}

func TestSocketRoundTrip(t *testing.T) {
	path := SocketPath(t.TempDir(), "/mnt/a")
	s, err := Listen(path, SourceFunc(func() Snapshot { return snap }), nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Get(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Layers) != 2 || got.Layers[0] != snap.Layers[0] || got.Layers[1] != snap.Layers[1] || got.Mountpoint != "/mnt/a" {
		t.Errorf("Get = %+v, want %+v", got, snap)
	}
	if _, err := Listen(path, SourceFunc(func() Snapshot { return snap }), nil); err == nil {
		t.Error("a second server took a live socket")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("socket still there after Close: %v", err)
	}
	if _, err := Get(context.Background(), path); !errors.Is(err, ErrNoServer) {
		t.Errorf("Get after Close: %v, want ErrNoServer", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.sock")
	// A killed server leaves its socket file behind.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
	s2, err := Listen(path, SourceFunc(func() Snapshot { return snap }), nil)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	s2.Close()
}

func TestListenMetrics(t *testing.T) {
	tests := []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1:0", true},
		{"[::1]:0", true},
		{"localhost:0", true},
		{":0", false},
		{"0.0.0.0:0", false},
		{"192.0.2.1:0", false},
		{"example.com:0", false},
		{"127.0.0.1", false},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			s, err := ListenMetrics(tt.addr, SourceFunc(func() Snapshot { return snap }), nil)
			if tt.ok && err != nil && !strings.Contains(err.Error(), "assign requested address") {
				t.Fatalf("refused: %v", err)
			}
			if !tt.ok && err == nil {
				s.Close()
				t.Fatal("accepted")
			}
			if s != nil {
				s.Close()
			}
		})
	}
}

func TestWriteMetrics(t *testing.T) {
	var b strings.Builder
	if err := WriteMetrics(&b, snap); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"# TYPE stargz_mount_layer_fetched_bytes gauge\n",
		`stargz_mount_layer_fetched_bytes{mountpoint="/mnt/a",layer="sha256:aa"} 40` + "\n",
		`stargz_mount_layer_complete{mountpoint="/mnt/a",layer="sha256:bb"} 1` + "\n",
		`stargz_mount_layer_requests_total{mountpoint="/mnt/a",layer="sha256:aa"} 3` + "\n",
		`stargz_mount_layer_background{mountpoint="/mnt/a",layer="sha256:aa",state="running"} 1` + "\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %q:\n%s", want, out)
		}
	}
	if got := quote("a\"b\\c\nd"); got != `"a\"b\\c\nd"` {
		t.Errorf("quote = %s", got)
	}
}

func TestWriteTable(t *testing.T) {
	var b strings.Builder
	if err := WriteTable(&b, snap); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"Mount:  /mnt/a", "sha256:aa", "40 B of 100 B (40.0%)", "running", "Fetched 50 B of 110 B (45.5%)"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if got := size(3 << 20); got != "3.0 MiB" {
		t.Errorf("size(3 MiB) = %q", got)
	}
}

// TestBorrowedLayer: a layer another process serves shows who serves it,
// not counters of its own, and stays out of the totals.
func TestBorrowedLayer(t *testing.T) {
	s := Snapshot{Ref: "r/x@sha256:1", Mountpoint: "/mnt/b", Layers: []Layer{
		snap.Layers[0],
		{Digest: "sha256:cc", TotalBytes: 1000, Borrowed: true, ServerPID: 4242},
	}}
	var b strings.Builder
	if err := WriteTable(&b, s); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"shared, served by pid 4242", "Fetched 40 B of 100 B (40.0%)", "1 shared layer(s) served by another process"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	if err := WriteMetrics(&b, s); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`stargz_mount_layer_borrowed{mountpoint="/mnt/b",layer="sha256:cc"} 1` + "\n",
		`stargz_mount_layer_borrowed{mountpoint="/mnt/b",layer="sha256:aa"} 0` + "\n",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
