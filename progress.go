package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stargz-mount/stargz-mount/fetcher"
)

// progress shows one status line for the plain layers being downloaded,
// on a terminal only. A nil *progress shows nothing.
type progress struct {
	w io.Writer

	mu    sync.Mutex // guards total, count and the ticker state
	total int64      // bytes of every layer tracked so far
	count int        // layers tracked
	done  atomic.Int64
	stop  chan struct{}
}

// newProgress returns a progress display on f if it is a terminal, else nil.
func newProgress(f *os.File) *progress {
	if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err != nil {
		return nil
	}
	return &progress{w: f}
}

// track counts rc's bytes toward the display.
func (p *progress) track(rc io.ReadCloser, l fetcher.Layer) io.ReadCloser {
	if p == nil {
		return rc
	}
	p.mu.Lock()
	p.total += l.Size
	p.count++
	if p.stop == nil {
		p.stop = make(chan struct{})
		go p.loop(p.stop)
	}
	p.mu.Unlock()
	return &countingReader{rc: rc, n: &p.done}
}

func (p *progress) loop(stop chan struct{}) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			p.mu.Lock()
			if p.stop != stop {
				p.mu.Unlock()
				return
			}
			fmt.Fprintf(p.w, "\rfetching %d plain layer(s): %s of %s ", p.count, sizeString(p.done.Load()), sizeString(p.total))
			p.mu.Unlock()
		}
	}
}

// finish ends the status line.
func (p *progress) finish() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stop != nil {
		close(p.stop)
		fmt.Fprintf(p.w, "\r\033[Kfetched %d plain layer(s): %s\n", p.count, sizeString(p.done.Load()))
		p.stop = nil
	}
}

type countingReader struct {
	rc io.ReadCloser
	n  *atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.rc.Read(b)
	c.n.Add(int64(n))
	return n, err
}

func (c *countingReader) Close() error { return c.rc.Close() }
