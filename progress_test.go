package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stargz-mount/stargz-mount/fetcher"
)

// openPTY returns the controlling and the terminal side of a new
// pseudo-terminal.
func openPTY(t *testing.T) (ptm, pts *os.File) {
	t.Helper()
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	t.Cleanup(func() { ptm.Close() })
	if err := unix.IoctlSetPointerInt(int(ptm.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptm.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pts.Close() })
	return ptm, pts
}

func TestProgress(t *testing.T) {
	if p := newProgress(must(os.CreateTemp(t.TempDir(), "log"))); p != nil {
		t.Errorf("progress on a regular file")
	}
	var none *progress
	rc := io.NopCloser(strings.NewReader("x"))
	if none.track(rc, fetcher.Layer{}) != rc {
		t.Errorf("nil progress wraps readers")
	}
	none.finish()

	ptm, pts := openPTY(t)
	p := newProgress(pts)
	if p == nil {
		t.Fatal("no progress on a terminal")
	}
	r := p.track(io.NopCloser(bytes.NewReader(make([]byte, 3<<20))), fetcher.Layer{Size: 3 << 20})
	io.Copy(io.Discard, r)
	time.Sleep(400 * time.Millisecond) // at least one status line
	p.finish()
	pts.Close()
	out, _ := io.ReadAll(ptm) // EIO once the terminal side is closed and drained
	if s := string(out); !strings.Contains(s, "fetching 1 plain layer(s): 3.0 MiB of 3.0 MiB") || !strings.Contains(s, "\033[Kfetched 1 plain layer(s): 3.0 MiB") {
		t.Errorf("terminal shows %q", s)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
