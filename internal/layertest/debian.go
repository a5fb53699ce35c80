package layertest

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The Debian fixture: a minimal bookworm rootfs made by debootstrap from
// Debian's own packages, the same mirror and suite apt uses on the project's
// machines (/etc/apt/sources.list.d/debian.sources). STARGZ_TEST_DEBIAN_MIRROR
// overrides the mirror.
const (
	DebianSuite  = "bookworm"
	DebianMirror = "http://deb.debian.org/debian"
	// DebianCache keeps the rootfs tar between runs: debootstrap takes
	// minutes, reading the tar a second.
	DebianCache = "/var/cache/stargz-mount-test/debian-minbase.tar"
)

// DebianTar returns a tar of a minimal Debian rootfs (debootstrap
// --variant=minbase), with root-relative names and numeric owners. It is
// built once and cached at DebianCache. The test is skipped unless root
// (debootstrap needs it) and, with no cache yet, unless debootstrap is
// installed.
func DebianTar(t testing.TB) []byte {
	t.Helper()
	if b, err := os.ReadFile(DebianCache); err == nil {
		return b
	}
	if os.Geteuid() != 0 {
		t.Skip("the Debian fixture needs root to run debootstrap (CI runs this as root)")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("the Debian fixture needs debootstrap (Debian package debootstrap)")
	}
	mirror := DebianMirror
	if m := os.Getenv("STARGZ_TEST_DEBIAN_MIRROR"); m != "" {
		mirror = m
	}
	if err := os.MkdirAll(filepath.Dir(DebianCache), 0o755); err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp(filepath.Dir(DebianCache), "debootstrap")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(work)
	root := filepath.Join(work, "rootfs")
	t.Logf("building the Debian fixture with debootstrap from %s (once; cached at %s)", mirror, DebianCache)
	out, err := exec.Command("debootstrap", "--variant=minbase", DebianSuite, root, mirror).CombinedOutput()
	if err != nil {
		t.Fatalf("debootstrap: %v\n%s", err, tail(out, 4000))
	}
	b, err := TarDir(root)
	if err != nil {
		t.Fatalf("tar the Debian rootfs: %v", err)
	}
	if err := writeFileAtomic(DebianCache, b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TarDir returns a layer tar of the tree at root with GNU tar: numeric
// owners, xattrs, root-relative names, and no downloaded package files.
func TarDir(root string) ([]byte, error) {
	raw, err := exec.Command("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*",
		"--exclude=./var/cache/apt/archives/*.deb", "--exclude=./var/lib/apt/lists/*_Packages",
		"-C", root, "-cf", "-", ".").Output()
	if err != nil {
		return nil, fmt.Errorf("tar -C %s: %w", root, err)
	}
	return stripDotSlash(raw)
}

// stripDotSlash rewrites a tar made with `tar -C DIR .`: names lose their
// "./" prefix and the entry for the root itself is dropped, as image layers
// have them.
func stripDotSlash(raw []byte) ([]byte, error) {
	var buf bytes.Buffer
	tr := tar.NewReader(bytes.NewReader(raw))
	tw := tar.NewWriter(&buf)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		h.Name = strings.TrimPrefix(h.Name, "./")
		if h.Name == "" || h.Name == "." {
			continue
		}
		if h.Typeflag == tar.TypeLink {
			h.Linkname = strings.TrimPrefix(h.Linkname, "./")
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("%s: %w", h.Name, err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return nil, fmt.Errorf("%s: %w", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// DebianImage builds an eStargz image whose bottom layer is the Debian
// fixture (DebianTar) and whose further layers are extra, bottom first,
// with image config cfg (its zero value gets Debian's PATH and /bin/bash as
// Cmd). The test is skipped as DebianTar says.
func DebianImage(t testing.TB, cfg v1.Config, extra ...[]Entry) v1.Image {
	t.Helper()
	b := debianBlob(t)
	blobs := []*Blob{b}
	for i, entries := range extra {
		b, err := Estargz(Tar(entries...), estargz.WithChunkSize(64<<10), estargz.WithParallelism(1))
		if err != nil {
			t.Fatalf("extra layer %d: %v", i, err)
		}
		blobs = append(blobs, b)
	}
	if len(cfg.Env) == 0 {
		cfg.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	if len(cfg.Cmd) == 0 && len(cfg.Entrypoint) == 0 {
		cfg.Cmd = []string{"/bin/bash"}
	}
	img, err := ImageWithConfig(cfg, blobs...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// debianBlob returns the Debian fixture as an eStargz blob, cached next to
// DebianCache (the conversion takes longer than the push).
func debianBlob(t testing.TB) *Blob {
	t.Helper()
	base := DebianTar(t)
	sum := sha256.Sum256(base)
	key := hex.EncodeToString(sum[:])
	dataPath, metaPath := DebianCache+".estargz", DebianCache+".estargz.json"
	type meta struct {
		TarSHA256        string
		Digest, DiffID   string
		UncompressedSize int64
		TOCDigest        string
	}
	var m meta
	if mb, err := os.ReadFile(metaPath); err == nil && json.Unmarshal(mb, &m) == nil && m.TarSHA256 == key {
		if data, err := os.ReadFile(dataPath); err == nil {
			if b, err := newBlob(data, m.DiffID, m.UncompressedSize); err == nil && b.Digest.String() == m.Digest {
				b.TOCDigest = m.TOCDigest
				return b
			}
		}
	}
	b, err := Estargz(base, estargz.WithChunkSize(1<<20))
	if err != nil {
		t.Fatalf("eStargz of the Debian rootfs: %v", err)
	}
	m = meta{TarSHA256: key, Digest: b.Digest.String(), DiffID: b.DiffID.String(), UncompressedSize: b.UncompressedSize, TOCDigest: b.TOCDigest}
	mb, _ := json.Marshal(m)
	// Best effort: a run that cannot write the cache still has the blob.
	if err := writeFileAtomic(dataPath, b.Data); err == nil {
		writeFileAtomic(metaPath, mb)
	}
	return b
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ImageWithConfig is Image with the given container config (entrypoint,
// cmd, env, user, working dir ...) instead of Image's default.
func ImageWithConfig(cfg v1.Config, blobs ...*Blob) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.ConfigFile(img, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Created:      v1.Time{Time: DefaultMTime},
		RootFS:       v1.RootFS{Type: "layers"},
		Config:       cfg,
	})
	if err != nil {
		return nil, err
	}
	adds := make([]mutate.Addendum, len(blobs))
	for i, b := range blobs {
		adds[i] = mutate.Addendum{
			Layer:       b.Layer(),
			Annotations: b.Annotations(),
			MediaType:   b.mediaType(),
			History:     v1.History{Created: v1.Time{Time: DefaultMTime}, CreatedBy: fmt.Sprintf("layertest layer %d", i)},
		}
	}
	return mutate.Append(img, adds...)
}
