package layertest

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// DistributionBinary is Debian's build of the distribution registry.
const DistributionBinary = "/usr/bin/docker-registry"

// InProcessRegistry serves go-containerregistry's in-memory registry on
// 127.0.0.1 and returns its host:port. It is closed in t.Cleanup. Unlike the
// distribution registry it only understands single "bytes=A-B" ranges: an
// open-ended or multi-range request gets 416.
func InProcessRegistry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// Registry is a running distribution registry.
type Registry struct {
	Addr string // host:port, plain HTTP
	Root string // filesystem storage root directory
}

// BlobPath returns where the registry stores the blob with digest d
// ("sha256:..."), so tests can tamper with it. The registry keeps no blob
// descriptor cache, so a changed file is served verbatim (new length
// included) under the old digest and Docker-Content-Digest header.
func (r *Registry) BlobPath(d string) string {
	algo, hex, _ := strings.Cut(d, ":")
	if len(hex) < 2 {
		return ""
	}
	return filepath.Join(r.Root, "docker/registry/v2/blobs", algo, hex[:2], hex, "data")
}

// DistributionRegistry starts the real distribution registry
// (docker-registry serve) with filesystem storage in t.TempDir() on a free
// 127.0.0.1 port, waits until GET /v2/ answers, and kills it in t.Cleanup.
// It skips the test if the binary is missing.
func DistributionRegistry(t testing.TB) *Registry {
	t.Helper()
	if _, err := os.Stat(DistributionBinary); err != nil {
		t.Skipf("distribution registry not available (%v); install Debian's docker-registry", err)
	}
	var lastErr error
	for range 3 { // retry in case another process takes the port we picked
		r, err := startRegistry(t)
		if err == nil {
			return r
		}
		lastErr = err
	}
	t.Fatalf("starting %s: %v", DistributionBinary, lastErr)
	return nil
}

func startRegistry(t testing.TB) (*Registry, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	dir := t.TempDir()
	r := &Registry{Addr: fmt.Sprintf("127.0.0.1:%d", port), Root: filepath.Join(dir, "storage")}
	// No storage.cache: a blob descriptor cache would hide tampered blobs.
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: layertest
`, r.Root, r.Addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "registry.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	output := func() string { // the log without the 404s of ordinary existence checks
		b, _ := os.ReadFile(logPath)
		var keep []string
		for _, l := range strings.SplitAfter(string(b), "\n") {
			if !strings.Contains(l, "http.response.status=404") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "")
	}
	cmd := exec.Command(DistributionBinary, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Kill()
		<-exited
	}

	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exited:
			return nil, fmt.Errorf("registry exited early: %s", output())
		default:
		}
		resp, err := client.Get("http://" + r.Addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			stop()
			return nil, fmt.Errorf("registry at %s not ready after 10s: %v; output: %s", r.Addr, err, output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		stop()
		if s := output(); t.Failed() && s != "" {
			t.Logf("docker-registry output:\n%s", s)
		}
	})
	return r, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Push writes img to ref (e.g. "127.0.0.1:5000/corpus:latest"). go-containerregistry
// uses plain HTTP for 127.0.0.1 and localhost.
func Push(t testing.TB, img v1.Image, ref string) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatalf("parse %q: %v", ref, err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// ClosedAddr returns a loopback host:port that nothing listens on, for
// "registry unreachable" tests.
func ClosedAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
