package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// openPTY returns the two ends of a new pseudo-terminal.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		master.Close()
		t.Fatalf("ptsname: %v", err)
	}
	slave, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { slave.Close(); master.Close() })
	return master, slave
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestProgress mounts with --daemon and stderr on a terminal (progress is
// drawn there until ready), with --quiet (none), and with stderr a pipe
// (none); and an image with a plain gzip layer, whose download has a bar.
func TestProgress(t *testing.T) {
	needFUSE(t)
	reg := newCountingRegistry(t)
	ref, _, _, _ := fastImage(t, reg.addr)
	plain, err := lt.Gzip(lt.Tar(lt.File("big", lt.Random("big", 3<<20))))
	if err != nil {
		t.Fatal(err)
	}
	plainImg, err := lt.Image(plain)
	if err != nil {
		t.Fatal(err)
	}
	plainRef := reg.addr + "/progress-plain:1"
	lt.Push(t, plainImg, plainRef)
	// The bar ends full, with the blob's size as a byte count.
	mib := float64(len(plain.Data)) / (1 << 20)
	plainSize := fmt.Sprintf("(%.1f/%.1f MiB", mib, mib)
	tests := []struct {
		name     string
		ref      string
		terminal bool
		flags    []string
		want     []string // in the output; nil: no output at all
	}{
		{"terminal", ref, true, nil, []string{"resolving " + ref, "layers", "2/2", "prefetch"}},
		{"quiet", ref, true, []string{"--quiet"}, nil},
		{"pipe", ref, false, nil, nil},
		{"plain layer on a terminal", plainRef, true, nil, []string{"resolving " + plainRef, "plain layers 100%", plainSize}},
		{"plain layer, quiet", plainRef, true, []string{"--quiet"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			cmd := e.cmd(append(append(tt.flags, "--daemon", "--background-fetch=false"), tt.ref, e.target)...)
			var out fmt.Stringer
			if tt.terminal {
				master, slave := openPTY(t)
				buf := &syncBuffer{}
				go func() {
					p := make([]byte, 4096)
					for {
						n, err := master.Read(p)
						buf.Write(p[:n])
						if err != nil {
							return
						}
					}
				}()
				cmd.Stdout, cmd.Stderr = slave, slave
				out = buf
			} else {
				buf := &syncBuffer{}
				cmd.Stdout, cmd.Stderr = buf, buf
				out = buf
			}
			if err := cmd.Run(); err != nil {
				t.Fatalf("mount: %v\n%s", err, out)
			}
			// Let the terminal drain: what was drawn before ready may
			// still be in the pseudo-terminal's buffer.
			deadline := time.Now().Add(5 * time.Second)
			for tt.want != nil && !strings.Contains(out.String(), tt.want[len(tt.want)-1]) && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond)
			got := out.String()
			if tt.want == nil && strings.TrimSpace(got) != "" {
				t.Errorf("output %q, want none", got)
			}
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("output lacks %q:\n%q", w, got)
				}
			}
			e.umount()
			e.assertClean()
		})
	}
}
