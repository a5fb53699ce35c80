// Package stats publishes a mount's per-layer statistics: as JSON over a
// unix socket in the runtime directory, named after the mount point, and
// as Prometheus text on a loopback TCP address. Get reads them back for
// `stargz-mount stats`.
//
// It knows nothing of layers or registries: the caller hands it a Source
// that fills in a Snapshot.
package stats

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Layer is one layer's statistics. Byte counts are compressed blob bytes.
type Layer struct {
	Digest string `json:"digest"`
	// TotalBytes is the size of the layer's file data, FetchedBytes how
	// much of it has been fetched and verified once; Complete is set when
	// that is all of it.
	TotalBytes   int64 `json:"total_bytes"`
	FetchedBytes int64 `json:"fetched_bytes"`
	Complete     bool  `json:"complete"`
	Chunks       int   `json:"chunks"`
	ChunksKept   int   `json:"chunks_fetched"`

	MemoryHits   int64 `json:"memory_hits"`
	MemoryMisses int64 `json:"memory_misses"`
	DiskHits     int64 `json:"disk_hits"`
	DiskMisses   int64 `json:"disk_misses"`

	// Requests and TransferredBytes are the HTTP requests made for the
	// blob (TOC and retries included) and the body bytes they brought.
	Requests         int64 `json:"requests"`
	TransferredBytes int64 `json:"transferred_bytes"`
	Retries          int64 `json:"retries"`
	Errors           int64 `json:"errors"`
	// DataRequests counts the reads of file data (on-demand, prefetch and
	// background), each one or more HTTP requests.
	DataRequests int64 `json:"data_requests"`

	// FilesSaved counts files saved whole in the disk cache for FUSE
	// passthrough; PassthroughOpens counts the opens the kernel then
	// served from such a copy, whose reads the daemon never sees.
	FilesSaved       int64 `json:"files_saved"`
	PassthroughOpens int64 `json:"passthrough_opens"`

	PrefetchBytes int64  `json:"prefetch_bytes"`
	Prefetch      string `json:"prefetch"`
	Background    string `json:"background"`

	// Borrowed is set when another process serves the layer: this mount
	// uses that process's FUSE mount of it (a shared layer), so its reads
	// are served, fetched and counted there, not here. ServerPID is that
	// process, when known.
	Borrowed  bool `json:"borrowed,omitempty"`
	ServerPID int  `json:"server_pid,omitempty"`
}

// Snapshot is a mount's statistics at one moment.
type Snapshot struct {
	Ref        string  `json:"ref"`
	Mountpoint string  `json:"mountpoint"`
	Layers     []Layer `json:"layers"`
}

// Source produces snapshots on request.
type Source interface {
	Snapshot() Snapshot
}

// SourceFunc is a function as a Source.
type SourceFunc func() Snapshot

// Snapshot implements Source.
func (f SourceFunc) Snapshot() Snapshot { return f() }

// RuntimeDir is where sockets live: /run/stargz-mount for root, else
// $XDG_RUNTIME_DIR/stargz-mount, else a per-user directory in the
// temporary directory.
func RuntimeDir() string {
	if os.Geteuid() == 0 {
		return "/run/stargz-mount"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "stargz-mount")
	}
	return filepath.Join(os.TempDir(), "stargz-mount-"+strconv.Itoa(os.Geteuid()))
}

// SocketPath is the socket of the mount at mountpoint (an absolute, clean
// path) in dir. The name is a hash, so any mount point fits the 107 bytes
// a socket path may have.
func SocketPath(dir, mountpoint string) string {
	h := sha256.Sum256([]byte(mountpoint))
	return filepath.Join(dir, hex.EncodeToString(h[:12])+".sock")
}

// Server serves a Source over HTTP on one listener.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	path string // the socket file to remove at Close; empty for TCP
}

func handler(src Source) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(src.Snapshot())
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		WriteMetrics(w, src.Snapshot())
	})
	return mux
}

func serve(ln net.Listener, path string, src Source, logger *slog.Logger) *Server {
	s := &Server{
		srv:  &http.Server{Handler: handler(src), ReadHeaderTimeout: 5 * time.Second, ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn)},
		ln:   ln,
		path: path,
	}
	go s.srv.Serve(ln)
	return s
}

// Listen serves src at the unix socket path (mode 0600 in a 0700
// directory for non-root users; 0666 for root, so others can read stats).
// A stale socket left by a killed server is replaced; a live one is an
// error.
func Listen(path string, src Source, logger *slog.Logger) (*Server, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("stats socket: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("stats socket %s is in use by another server", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("stats socket: %w", err)
	}
	mode := os.FileMode(0o600)
	if os.Geteuid() == 0 {
		mode = 0o666
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("stats socket: %w", err)
	}
	return serve(ln, path, src, logger), nil
}

// ErrNotLoopback refuses a metrics address other hosts could reach.
var ErrNotLoopback = errors.New("metrics address must be a loopback address (127.0.0.1:PORT, [::1]:PORT or localhost:PORT)")

// ListenMetrics serves src as Prometheus text at http://addr/metrics. addr
// must be a loopback host and a port.
func ListenMetrics(addr string, src Source, logger *slog.Logger) (*Server, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if err := CheckMetricsAddr(addr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address: %w", err)
	}
	return serve(ln, "", src, logger), nil
}

// CheckMetricsAddr checks that addr is a loopback host and a port.
func CheckMetricsAddr(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("metrics address %q: %w", addr, err)
	}
	if !loopback(host) {
		return fmt.Errorf("metrics address %q: %w", addr, ErrNotLoopback)
	}
	return nil
}

func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Addr is the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops serving and removes the socket file.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if s.path != "" {
		if rerr := os.Remove(s.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

// ErrNoServer means no stargz-mount serves the mount point asked about.
var ErrNoServer = errors.New("no stargz-mount server for this mount point")

// Get fetches the snapshot served at the unix socket path.
func Get(ctx context.Context, path string) (*Snapshot, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://stargz-mount/stats", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w (socket %s: %v)", ErrNoServer, path, err)
		}
		return nil, fmt.Errorf("stats socket %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return nil, fmt.Errorf("stats socket %s: HTTP %s: %s", path, resp.Status, b)
	}
	var s Snapshot
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, fmt.Errorf("stats socket %s: %w", path, err)
	}
	return &s, nil
}
