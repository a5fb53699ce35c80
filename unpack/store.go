package unpack

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrDigest is returned when a blob's bytes do not match its digest.
var ErrDigest = errors.New("blob does not match its digest")

// Decompressor turns a compressed blob stream into the layer tar.
type Decompressor func(io.Reader) (io.ReadCloser, error)

// Store keeps unpacked layers under DIR/layers/sha256/HEX, one directory per
// blob digest, shared by every mount that uses the same cache directory and
// unpacks the same way (see NewStore).
type Store struct {
	dir  string   // DIR/layers
	opts []Option // for Tar
}

// NewStore returns the store of unpacked layers under cacheDir; opts are
// how Tar unpacks them. Layers in the default form (kernel overlayfs's)
// live in cacheDir/layers/sha256/HEX; layers in another form (file
// whiteouts or another opaque xattr, for fuse-overlayfs without root) in
// cacheDir/layers/FORM/sha256/HEX, FORM naming it (for example
// "files-user.overlay.opaque"), so that root and rootless mounts sharing
// a cache dir never stack each other's layers.
func NewStore(cacheDir string, opts ...Option) *Store {
	dir := filepath.Join(cacheDir, "layers")
	if f := newConfig(opts).form(); f != "" {
		dir = filepath.Join(dir, f)
	}
	return &Store{dir: dir, opts: opts}
}

// form names how c unpacks layers, "" for the default.
func (c config) form() string {
	if c == newConfig(nil) {
		return ""
	}
	w := "chardev"
	if c.fileWhiteouts {
		w = "files"
	}
	return w + "-" + strings.ReplaceAll(c.opaqueXattr, "/", "_")
}

var sha256Digest = regexp.MustCompile(`^sha256:([0-9a-f]{64})$`)

// Path is where the layer with blob digest dgst lives once unpacked.
func (s *Store) Path(dgst string) (string, error) {
	m := sha256Digest.FindStringSubmatch(dgst)
	if m == nil {
		return "", fmt.Errorf("blob digest %q: only sha256 digests are supported", dgst)
	}
	return filepath.Join(s.dir, "sha256", m[1]), nil
}

// Layer returns the directory of the unpacked layer with blob digest dgst.
// If no mount has unpacked it yet, it calls open for the compressed blob,
// unpacks it through decompress into a temporary directory while hashing
// the compressed bytes, and renames the directory into place only if the
// hash matches dgst (ErrDigest otherwise). Concurrent calls for one digest,
// in this process or others, unpack it once.
func (s *Store) Layer(ctx context.Context, dgst string, open func(context.Context) (io.ReadCloser, error), decompress Decompressor) (string, error) {
	final, err := s.Path(dgst)
	if err != nil {
		return "", err
	}
	if fi, err := os.Stat(final); err == nil && fi.IsDir() {
		return final, nil
	}
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		return "", fmt.Errorf("layer store: %w", err)
	}
	unlock, err := lock(ctx, final+".lock")
	if err != nil {
		return "", err
	}
	defer unlock()
	if fi, err := os.Stat(final); err == nil && fi.IsDir() {
		return final, nil // another mount unpacked it while we waited
	}

	// Under the lock, temporary directories of this digest are leftovers
	// of a process that died while unpacking.
	if stale, _ := filepath.Glob(final + ".tmp-*"); len(stale) > 0 {
		for _, d := range stale {
			os.RemoveAll(d)
		}
	}
	tmp, err := os.MkdirTemp(filepath.Dir(final), filepath.Base(final)+".tmp-")
	if err != nil {
		return "", fmt.Errorf("layer store: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	blob, err := open(ctx)
	if err != nil {
		return "", err
	}
	defer blob.Close()
	h := sha256.New()
	if err := unpackVerified(io.TeeReader(blob, h), tmp, decompress, s.opts); err != nil {
		return "", err
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != dgst {
		return "", fmt.Errorf("layer %s: got %s: %w", dgst, got, ErrDigest)
	}
	// Record the size first, so that listing the store need not walk it.
	writeSize(final, du(tmp))
	if err := os.Rename(tmp, final); err != nil {
		return "", fmt.Errorf("layer store: %w", err)
	}
	ok = true
	return final, nil
}

// unpackVerified unpacks the tar from the compressed stream r into dir and
// then reads r to its end, so that a hash of r covers the whole blob.
func unpackVerified(r io.Reader, dir string, decompress Decompressor, opts []Option) error {
	zr, err := decompress(r)
	if err != nil {
		return fmt.Errorf("decompress layer: %w", err)
	}
	err = Tar(zr, dir, opts...)
	if err == nil {
		// Compressed formats may have trailing frames or padding after the
		// tar's end marker: drain them through the decompressor (which
		// checks them) and then the rest of the blob.
		_, err = io.Copy(io.Discard, zr)
	}
	if cerr := zr.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		return fmt.Errorf("read layer blob: %w", err)
	}
	return nil
}

// lock takes an exclusive flock on path, waiting for it until ctx is done.
func lock(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("layer lock: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- unix.Flock(int(f.Fd()), unix.LOCK_EX) }()
	select {
	case err := <-done:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("layer lock: %w", err)
		}
		return func() { f.Close() }, nil
	case <-ctx.Done():
		go func() { <-done; f.Close() }()
		return nil, ctx.Err()
	}
}

// writeSize records n as the disk usage of the layer at final, in
// final.size (temp file + rename).
func writeSize(final string, n int64) {
	tmp := final + ".size.tmp"
	if err := os.WriteFile(tmp, []byte(strconv.FormatInt(n, 10)), 0o600); err == nil {
		os.Rename(tmp, final+".size")
	}
}

// size is the recorded disk usage of the layer at final, walking it if
// nothing was recorded.
func size(final string) int64 {
	if b, err := os.ReadFile(final + ".size"); err == nil {
		if n, err := strconv.ParseInt(string(b), 10, 64); err == nil && n >= 0 {
			return n
		}
	}
	n := du(final)
	writeSize(final, n)
	return n
}
