package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progressFDEnv names the file descriptor a --daemon child draws its
// progress on: the parent's terminal, until the mount is ready.
const progressFDEnv = "STARGZ_MOUNT_PROGRESS_FD"

// progressWriter is where progress goes: the daemon parent's terminal, or
// stderr when it is a terminal; nil (no progress) otherwise or when quiet.
func progressWriter(quiet bool) io.Writer {
	if quiet {
		return nil
	}
	if fd := os.Getenv(progressFDEnv); fd != "" {
		n, err := strconv.Atoi(fd)
		if err != nil {
			return nil
		}
		f := os.NewFile(uintptr(n), "progress")
		if f == nil {
			return nil
		}
		if !term.IsTerminal(n) {
			f.Close()
			return nil
		}
		return f
	}
	if term.IsTerminal(int(os.Stderr.Fd())) {
		return os.Stderr
	}
	return nil
}

// progress draws one bar at a time for the phases of a mount: resolving,
// TOCs, prefetch and background fetch. A nil *progress draws nothing.
type progress struct {
	w io.Writer

	mu   sync.Mutex // guards bar and stop
	bar  *progressbar.ProgressBar
	stop chan struct{} // closed to end the current phase's poller
}

func newProgress(w io.Writer) *progress {
	if w == nil {
		return nil
	}
	return &progress{w: w}
}

// phase ends the current bar and starts the one mk makes.
func (p *progress) phase(mk func() *progressbar.ProgressBar) (*progressbar.ProgressBar, chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLocked()
	p.bar = mk()
	p.stop = make(chan struct{})
	return p.bar, p.stop
}

func (p *progress) endLocked() {
	if p.stop != nil {
		close(p.stop)
		p.stop = nil
	}
	if p.bar != nil {
		p.bar.Finish()
		fmt.Fprintln(p.w)
		p.bar = nil
	}
}

func (p *progress) options(desc string, extra ...progressbar.Option) []progressbar.Option {
	return append([]progressbar.Option{
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100 * time.Millisecond),
		progressbar.OptionSetRenderBlankState(true),
		progressbar.OptionUseIECUnits(true),
	}, extra...)
}

// spin shows desc with a spinner until the next phase.
func (p *progress) spin(desc string) {
	if p == nil {
		return
	}
	b, stop := p.phase(func() *progressbar.ProgressBar {
		return progressbar.NewOptions(-1, p.options(desc, progressbar.OptionSpinnerType(14))...)
	})
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				b.Add(1)
			case <-stop:
				return
			}
		}
	}()
}

// count shows a bar of n steps; the result adds one step.
func (p *progress) count(desc string, n int) func() {
	if p == nil {
		return func() {}
	}
	b, _ := p.phase(func() *progressbar.ProgressBar {
		return progressbar.NewOptions(n, p.options(desc, progressbar.OptionShowCount())...)
	})
	return func() { b.Add(1) }
}

// bytes shows a bar of total bytes, polling current until it reaches
// total or the next phase starts.
func (p *progress) bytes(desc string, total int64, current func() int64) {
	if p == nil || total <= 0 {
		return
	}
	b, stop := p.phase(func() *progressbar.ProgressBar {
		return progressbar.NewOptions64(total, p.options(desc, progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(), progressbar.OptionShowTotalBytes(true))...)
	})
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			n := current()
			b.Set64(min(n, total))
			if n >= total {
				return
			}
			select {
			case <-t.C:
			case <-stop:
				return
			}
		}
	}()
}

// done ends the last bar.
func (p *progress) done() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLocked()
}
