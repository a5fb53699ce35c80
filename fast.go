package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"

	"github.com/stargz-mount/stargz-mount/fetcher"
	"github.com/stargz-mount/stargz-mount/reader"
	"github.com/stargz-mount/stargz-mount/stats"
)

// fastFlags are the flags of fast start: prefetch, background fetch,
// progress, stats and the access trace.
func fastFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "prefetch", Value: true, Usage: "fetch each layer's prioritized files (those before .prefetch.landmark) in one request before the mount is ready; --prefetch=false to skip"},
		&cli.DurationFlag{Name: "prefetch-timeout", Value: 10 * time.Second, Usage: "report the mount ready after at most `DURATION` of prefetching; prefetching goes on"},
		&cli.BoolFlag{Name: "background-fetch", Value: true, Usage: "once the mount is ready, fetch the rest of every layer at low priority, in the pauses of the workload (after 500ms without a request); --background-fetch=false to skip"},
		&cli.StringFlag{Name: "background-bandwidth", Value: "0", Usage: "cap background fetching at `SIZE` per second (64MiB, 10MB); 0 is no cap"},
		&cli.StringFlag{Name: "metrics-addr", Usage: "serve Prometheus metrics at http://`HOST:PORT`/metrics (loopback addresses only)"},
		&cli.StringFlag{Name: "record", Usage: "at unmount, write to `FILE` the paths read in each layer, in order of first read (JSON)"},
		&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress display on stderr"},
	}
}

// layerBlobs returns one blob reader per layer, kept for their counters.
func layerBlobs(img *fetcher.Image) []*fetcher.Blob {
	blobs := make([]*fetcher.Blob, len(img.Layers))
	for i, l := range img.Layers {
		blobs[i] = img.Blob(l)
	}
	return blobs
}

// session is what runs beside a mount: prefetch, background fetch, the
// stats socket and metrics, the access trace.
type session struct {
	ref    string
	target string
	img    *fetcher.Image
	blobs  []*fetcher.Blob
	layers []*reader.Layer
	prog   *progress
	logger *slog.Logger

	ctx        context.Context
	cancel     context.CancelFunc // stops prefetch and background fetch
	wg         sync.WaitGroup     // prefetch and background goroutines
	prefetched chan struct{}      // closed when every layer's prefetch ended

	servers []*stats.Server

	// borrowed are the layers another process serves (shared layer
	// mounts), to its pid: this process neither prefetches nor fetches
	// them. Set by borrow before prefetching starts, read-only after.
	borrowed map[*reader.Layer]int
}

func newSession(ref string, img *fetcher.Image, blobs []*fetcher.Blob, layers []*reader.Layer, prog *progress, logger *slog.Logger) *session {
	ctx, cancel := context.WithCancel(context.Background())
	return &session{ref: ref, img: img, blobs: blobs, layers: layers, prog: prog, logger: logger,
		ctx: ctx, cancel: cancel, prefetched: make(chan struct{})}
}

// borrow notes which of the session's layers another process serves.
func (s *session) borrow(m interface {
	Borrowed(*reader.Layer) (int, bool)
}) {
	for _, l := range s.layers {
		if pid, ok := m.Borrowed(l); ok {
			if s.borrowed == nil {
				s.borrowed = map[*reader.Layer]int{}
			}
			s.borrowed[l] = pid
			l.DropEarlyPrefetch() // the serving process prefetched it
		}
	}
}

// served are the layers this process serves: all but the borrowed ones.
func (s *session) served() []*reader.Layer {
	out := make([]*reader.Layer, 0, len(s.layers))
	for _, l := range s.layers {
		if _, ok := s.borrowed[l]; !ok {
			out = append(out, l)
		}
	}
	return out
}

// startPrefetch prefetches every served layer's prioritized region, all
// layers in parallel.
func (s *session) startPrefetch(enabled bool) {
	if !enabled {
		close(s.prefetched)
		return
	}
	layers := s.served()
	var total int64
	for _, l := range layers {
		total += l.PrefetchBytes()
	}
	s.prog.bytes("prefetch", total, func() int64 {
		var n int64
		for _, l := range layers {
			n += min(l.Stats().FetchedBytes, l.PrefetchBytes())
		}
		return n
	})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(s.prefetched)
		var g errgroup.Group
		for _, l := range layers {
			g.Go(func() error {
				if err := l.Prefetch(s.ctx); err != nil && s.ctx.Err() == nil {
					s.logger.Warn("prefetch failed; files are fetched when read", "err", err)
				}
				return nil
			})
		}
		g.Wait()
	}()
}

// waitPrefetch waits for prefetching to end, at most timeout.
func (s *session) waitPrefetch(timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-s.prefetched:
	case <-t.C:
		s.logger.Info("prefetch goes on after the mount is ready", "timeout", timeout)
	}
}

// startBackground fetches the rest of every layer once prefetching ended.
// capacity is what the caches hold (memory and disk): an image whose data
// is larger is not fetched, as it would only evict what reads need.
func (s *session) startBackground(bandwidth, capacity int64) {
	layers := s.served()
	if len(layers) == 0 {
		return
	}
	var total, data int64
	for _, l := range layers {
		st := l.Stats()
		total += st.TotalBytes
		data += st.DataBytes
	}
	if data > capacity {
		s.logger.Info("no background fetch: the image's data does not fit in the caches (--cache-max-memory, --cache-max-disk)", "data", data, "capacity", capacity)
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case <-s.prefetched:
		case <-s.ctx.Done():
			return
		}
		s.prog.bytes("background fetch", total, func() int64 {
			var n int64
			for _, l := range layers {
				n += l.Stats().FetchedBytes
			}
			return n
		})
		start := time.Now()
		err := reader.FetchAll(s.ctx, layers, reader.WithBandwidth(bandwidth))
		switch {
		case s.ctx.Err() != nil:
		case err != nil:
			s.logger.Warn("background fetch ended", "err", err)
		default:
			s.logger.Info("every layer is local", "bytes", total, "took", time.Since(start).Round(time.Millisecond))
			s.prog.done()
		}
	}()
}

// Snapshot implements stats.Source.
func (s *session) Snapshot() stats.Snapshot {
	snap := stats.Snapshot{Ref: s.ref, Mountpoint: s.target, Layers: make([]stats.Layer, len(s.layers))}
	for i, l := range s.layers {
		if pid, ok := s.borrowed[l]; ok {
			// Served, fetched and counted by that process.
			snap.Layers[i] = stats.Layer{Digest: l.Name(), Borrowed: true, ServerPID: pid, Prefetch: "none", Background: "none"}
			continue
		}
		ls := l.Stats()
		bc := s.blobs[i].Stats()
		snap.Layers[i] = stats.Layer{
			Digest:           l.Name(),
			TotalBytes:       ls.TotalBytes,
			FetchedBytes:     ls.FetchedBytes,
			Complete:         ls.Complete,
			Chunks:           ls.Chunks,
			ChunksKept:       ls.ChunksKept,
			MemoryHits:       ls.MemoryHits,
			MemoryMisses:     ls.MemoryMisses,
			DiskHits:         ls.DiskHits,
			DiskMisses:       ls.DiskMisses,
			Requests:         bc.Requests,
			TransferredBytes: bc.Bytes,
			Retries:          bc.Retries,
			Errors:           bc.Errors,
			DataRequests:     ls.Requests,
			FilesSaved:       ls.FilesSaved,
			PassthroughOpens: ls.SavedOpens,
			PrefetchBytes:    ls.PrefetchBytes,
			Prefetch:         ls.Prefetch,
			Background:       ls.Background,
		}
	}
	return snap
}

// publish serves the stats at the mount's socket and, with an address, as
// Prometheus metrics.
func (s *session) publish(target, metricsAddr string) error {
	s.target = target
	sock, err := stats.Listen(stats.SocketPath(stats.RuntimeDir(), target), s, s.logger)
	if err != nil {
		return err
	}
	s.servers = append(s.servers, sock)
	if metricsAddr != "" {
		ms, err := stats.ListenMetrics(metricsAddr, s, s.logger)
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		s.servers = append(s.servers, ms)
		s.logger.Info("serving metrics", "url", "http://"+ms.Addr()+"/metrics")
	}
	return nil
}

// record is the --record file.
type record struct {
	Ref    string        `json:"ref"`
	Layers []recordLayer `json:"layers"`
}

type recordLayer struct {
	Digest string   `json:"digest"`
	Paths  []string `json:"paths"` // in order of first read
}

// close stops fetching, stops serving stats (removing the socket) and
// writes the access trace to recordPath if it is set.
func (s *session) close(recordPath string) error {
	s.cancel()
	s.wg.Wait()
	s.prog.done()
	var errs []error
	for _, srv := range s.servers {
		if err := srv.Close(); err != nil {
			errs = append(errs, fmt.Errorf("stop stats server: %w", err))
		}
	}
	s.servers = nil
	if recordPath != "" {
		if err := s.writeRecord(recordPath); err != nil {
			errs = append(errs, fmt.Errorf("--record: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (s *session) writeRecord(path string) error {
	r := record{Ref: s.ref, Layers: make([]recordLayer, len(s.layers))}
	for i, l := range s.layers {
		r.Layers[i] = recordLayer{Digest: l.Name(), Paths: l.Recorded()}
		if r.Layers[i].Paths == nil {
			r.Layers[i].Paths = []string{}
		}
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".record-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
