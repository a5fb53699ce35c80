package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// registry is a running Debian docker-registry (distribution) with
// filesystem storage.
type registry struct {
	addr string
	cmd  *exec.Cmd
	done chan struct{}
}

// startRegistry starts docker-registry on a free loopback port with its
// storage under dir, the way internal/layertest does for the tests.
func startRegistry(dir string) (*registry, error) {
	if _, err := os.Stat(lt.DistributionBinary); err != nil {
		return nil, fmt.Errorf("distribution registry: %w (install Debian's docker-registry: make bench-deps)", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
http:
  addr: %s
  secret: bench
`, filepath.Join(dir, "storage"), addr)
	cfgPath := filepath.Join(dir, "registry.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	r := &registry{addr: addr, cmd: exec.Command(lt.DistributionBinary, "serve", cfgPath), done: make(chan struct{})}
	r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start docker-registry: %w", err)
	}
	go func() { r.cmd.Wait(); close(r.done) }()
	client := &http.Client{Timeout: time.Second}
	for deadline := time.Now().Add(15 * time.Second); ; {
		select {
		case <-r.done:
			return nil, fmt.Errorf("docker-registry exited early; see %s", logFile.Name())
		default:
		}
		if resp, err := client.Get("http://" + addr + "/v2/"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r, nil
			}
		}
		if time.Now().After(deadline) {
			r.stop()
			return nil, fmt.Errorf("docker-registry at %s not ready after 15 s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *registry) stop() {
	r.cmd.Process.Kill()
	<-r.done
}

// rootfsDir returns a Debian bookworm minbase rootfs with python3-minimal,
// made with debootstrap once and kept in cacheDir between runs.
func rootfsDir(cacheDir, mirror string) (string, error) {
	dir := filepath.Join(cacheDir, "rootfs-bookworm-python3")
	if _, err := os.Stat(filepath.Join(dir, "usr/bin/python3")); err == nil {
		return dir, nil
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", fmt.Errorf("debootstrap not found (make bench-deps): %w", err)
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	slog.Info("debootstrap: building the python3 rootfs once", "dir", dir, "mirror", mirror)
	if err := run("debootstrap", "--variant=minbase", "--include=python3-minimal", "bookworm", tmp, mirror); err != nil {
		return "", err
	}
	// What an image build would clean: downloaded packages and apt lists.
	for _, glob := range []string{"var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*"} {
		m, _ := filepath.Glob(filepath.Join(tmp, glob))
		for _, f := range m {
			os.Remove(f)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return dir, nil
}

// debianMirror is the first Debian URI in apt's sources, so debootstrap
// uses the mirror this machine already reaches.
func debianMirror() string {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	files = append([]string{"/etc/apt/sources.list"}, files...)
	re := regexp.MustCompile(`(?m)^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s`)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if m := re.FindSubmatch(b); m != nil {
			return string(m[1])
		}
	}
	return "http://deb.debian.org/debian"
}

// tarDir returns an uncompressed tar of dir, with numeric owners, as an
// image build would store it.
func tarDir(dir string) ([]byte, error) {
	var out, errb bytes.Buffer
	cmd := exec.Command("tar", "--numeric-owner", "--sort=name", "-C", dir, "-cf", "-", ".")
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("tar %s: %v: %s", dir, err, errb.String())
	}
	return out.Bytes(), nil
}

// recordReads runs argv in a chroot of rootfs under strace and returns the
// regular files it opened or executed, in first-use order, as paths
// relative to the root with symlinks resolved (the names eStargz
// prioritizes).
func recordReads(rootfs string, argv ...string) ([]string, error) {
	if _, err := exec.LookPath("strace"); err != nil {
		return nil, fmt.Errorf("strace not found (make bench-deps): %w", err)
	}
	logPath := filepath.Join(os.TempDir(), fmt.Sprintf("bench-strace-%d.log", os.Getpid()))
	defer os.Remove(logPath)
	args := append([]string{"-f", "-e", "trace=file,chroot", "-o", logPath, "chroot", rootfs}, argv...)
	if out, err := exec.Command("strace", args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("strace chroot %v: %v\n%s", argv, err, out)
	}
	f, err := os.Open(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// execve("/usr/bin/python3", ...) = 0, openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3
	re := regexp.MustCompile(`^\d+\s+(execve|openat|open)\((?:AT_FDCWD, )?"([^"]+)".*\)\s+=\s+(\d+)`)
	inRoot := false
	seen := map[string]bool{}
	var files []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, " chroot(") && strings.HasSuffix(line, "= 0") {
			inRoot = true
			continue
		}
		m := re.FindStringSubmatch(line)
		if !inRoot || m == nil {
			continue
		}
		p := m[2]
		if !path.IsAbs(p) {
			p = "/" + p // chroot(1) changes to / after chroot(2)
		}
		rel, ok := resolveIn(rootfs, p)
		if !ok || seen[rel] {
			continue
		}
		if st, err := os.Lstat(filepath.Join(rootfs, rel)); err != nil || !st.Mode().IsRegular() {
			continue
		}
		seen[rel] = true
		files = append(files, rel)
		if m[1] != "execve" {
			continue
		}
		// The kernel loads the ELF interpreter without a system call
		// strace sees.
		if interp := elfInterp(filepath.Join(rootfs, rel)); interp != "" {
			if irel, ok := resolveIn(rootfs, interp); ok && !seen[irel] {
				seen[irel] = true
				files = append(files, irel)
			}
		}
	}
	return files, sc.Err()
}

// elfInterp returns the PT_INTERP path of an ELF executable, or "".
func elfInterp(p string) string {
	f, err := elf.Open(p)
	if err != nil {
		return ""
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			b, err := io.ReadAll(prog.Open())
			if err != nil {
				return ""
			}
			return strings.TrimRight(string(b), "\x00")
		}
	}
	return ""
}

// resolveIn resolves absolute path p inside root, following symlinks as
// the chrooted process would, and returns it relative to root.
func resolveIn(root, p string) (string, bool) {
	parts := strings.Split(strings.Trim(path.Clean(p), "/"), "/")
	cur := ""
	for hops := 0; len(parts) > 0; {
		c := parts[0]
		parts = parts[1:]
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			cur = path.Dir(cur)
			if cur == "." {
				cur = ""
			}
			continue
		}
		next := path.Join(cur, c)
		st, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if st.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		if hops++; hops > 40 {
			return "", false
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if path.IsAbs(target) {
			cur = ""
		}
		parts = append(strings.Split(strings.Trim(target, "/"), "/"), parts...)
	}
	return cur, cur != ""
}

// bigFile is the deterministic random content of the big-file image.
func bigFile(size int64) []byte {
	b := make([]byte, size)
	rand.NewChaCha8([32]byte{'s', 't', 'a', 'r', 'g', 'z'}).Read(b)
	return b
}

// image is one pushed image.
type image struct {
	Name        string `json:"name"`
	Repo        string `json:"repo"` // repository:tag in the registry
	Format      string `json:"format"`
	Layers      int    `json:"layers"`
	Compressed  int64  `json:"compressed_bytes"`
	Tar         int64  `json:"uncompressed_bytes"`
	Blob        string `json:"blob_digest"` // the (single) layer's digest
	Prioritized int    `json:"prioritized_files,omitempty"`
}

// push builds a one-layer image of blob and writes it to regAddr/repo.
func push(regAddr, repo, nameStr, format string, blob *lt.Blob) (image, error) {
	img, err := lt.Image(blob)
	if err != nil {
		return image{}, err
	}
	ref, err := name.ParseReference(regAddr + "/" + repo)
	if err != nil {
		return image{}, err
	}
	if err := remote.Write(ref, img); err != nil {
		return image{}, fmt.Errorf("push %s: %w", ref, err)
	}
	return image{Name: nameStr, Repo: repo, Format: format, Layers: 1,
		Compressed: int64(len(blob.Data)), Tar: blob.UncompressedSize, Blob: blob.Digest.String()}, nil
}

// blobCache keeps built layers on disk between runs: eStargz builds of
// the rootfs take most of a minute each.
type blobCache struct{ dir string }

type blobMeta struct {
	Digest, DiffID, TOCDigest string
	UncompressedSize          int64
}

// get returns the blob cached under key, or builds, stores and returns it.
func (c blobCache) get(key string, build func() (*lt.Blob, error)) (*lt.Blob, error) {
	sum := sha256.Sum256([]byte(key))
	base := filepath.Join(c.dir, hex.EncodeToString(sum[:8]))
	if mb, err := os.ReadFile(base + ".json"); err == nil {
		var m blobMeta
		data, derr := os.ReadFile(base + ".gz")
		if json.Unmarshal(mb, &m) == nil && derr == nil {
			d, _ := v1.NewHash(m.Digest)
			id, _ := v1.NewHash(m.DiffID)
			if got := sha256.Sum256(data); hex.EncodeToString(got[:]) == d.Hex {
				return &lt.Blob{Data: data, Digest: d, DiffID: id, UncompressedSize: m.UncompressedSize, TOCDigest: m.TOCDigest}, nil
			}
		}
	}
	b, err := build()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return b, nil // a cache we cannot write only costs time
	}
	mb, _ := json.Marshal(blobMeta{Digest: b.Digest.String(), DiffID: b.DiffID.String(), TOCDigest: b.TOCDigest, UncompressedSize: b.UncompressedSize})
	if writeFile(base+".gz", b.Data) == nil {
		writeFile(base+".json", mb)
	}
	return b, nil
}

// buildImages builds and pushes the python3 rootfs as plain gzip, eStargz
// and eStargz with prioritized files, and the big-file image. It returns
// them with the prioritized list and the big file's bytes.
func buildImages(regAddr, rootfs, cacheDir string, bigSize int64) (map[string]image, []string, []byte, error) {
	tarBytes, err := tarDir(rootfs)
	if err != nil {
		return nil, nil, nil, err
	}
	tarSum := sha256.Sum256(tarBytes)
	cache := blobCache{filepath.Join(cacheDir, "blobs")}
	prio, err := recordReads(rootfs, "python3", "-c", "print(1)")
	if err != nil {
		return nil, nil, nil, err
	}
	slog.Info("recorded files python3 reads", "files", len(prio))
	imgs := map[string]image{}
	add := func(key, repo, format string, build func() (*lt.Blob, error)) error {
		start := time.Now()
		b, err := cache.get(fmt.Sprintf("%s %x %q", key, tarSum, prio), build)
		if err != nil {
			return fmt.Errorf("build %s: %w", key, err)
		}
		im, err := push(regAddr, repo, key, format, b)
		if err != nil {
			return err
		}
		slog.Info("pushed", "image", repo, "compressed", im.Compressed, "took", time.Since(start).Round(time.Millisecond))
		imgs[key] = im
		return nil
	}
	var missed []string
	steps := []struct {
		key, repo, format string
		build             func() (*lt.Blob, error)
	}{
		{"gzip", "python:gzip", "plain gzip", func() (*lt.Blob, error) { return lt.Gzip(tarBytes) }},
		{"estargz", "python:estargz", "eStargz, no prioritized files", func() (*lt.Blob, error) { return lt.Estargz(tarBytes) }},
		{"estargz-prio", "python:estargz-prio", "eStargz, prioritized files first (those python3 -c 'print(1)' reads)", func() (*lt.Blob, error) {
			return lt.Estargz(tarBytes, estargz.WithPrioritizedFiles(prio), estargz.WithAllowPrioritizeNotFound(&missed))
		}},
	}
	for _, s := range steps {
		if err := add(s.key, s.repo, s.format, s.build); err != nil {
			return nil, nil, nil, err
		}
	}
	if len(missed) > 0 {
		slog.Warn("prioritized files not in the tar", "files", missed)
	}
	im := imgs["estargz-prio"]
	im.Prioritized = len(prio) - len(missed)
	imgs["estargz-prio"] = im

	big := bigFile(bigSize)
	tarSum = sha256.Sum256(big)
	if err := add("big", "big:estargz", "eStargz, one random file", func() (*lt.Blob, error) {
		return lt.Estargz(lt.Tar(lt.File("big.bin", big)))
	}); err != nil {
		return nil, nil, nil, err
	}
	return imgs, prio, big, nil
}

func run(name string, args ...string) error {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		tail := out.String()
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, tail)
	}
	return nil
}

// blobGet reads the blob once through the proxy and returns the seconds
// it took.
func blobGet(base, repo, digest string) (float64, int64, error) {
	repoName, _, _ := strings.Cut(repo, ":")
	start := time.Now()
	resp, err := http.Get(base + "/v2/" + repoName + "/blobs/" + digest)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET blob %s: %s", digest, resp.Status)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	return time.Since(start).Seconds(), n, err
}
