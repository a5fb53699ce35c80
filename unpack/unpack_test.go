package unpack

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for ownership, devices, whiteouts and trusted.* xattrs (CI runs this as root)")
	}
}

// check is one expectation on a path of the unpacked layer.
type check func(t *testing.T, layer string)

func lstat(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatalf("lstat: %v", err)
	}
	return st
}

func isFile(name, content string, mode uint32, uid, gid int) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		p := filepath.Join(layer, name)
		st := lstat(t, p)
		if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o7777 != mode || int(st.Uid) != uid || int(st.Gid) != gid {
			t.Errorf("%s: mode %o uid %d gid %d, want regular %o %d:%d", name, st.Mode, st.Uid, st.Gid, mode, uid, gid)
		}
		if b, _ := os.ReadFile(p); string(b) != content {
			t.Errorf("%s = %q, want %q", name, b, content)
		}
	}
}

func isNode(name string, typ uint32, major, minor uint32) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		st := lstat(t, filepath.Join(layer, name))
		if st.Mode&unix.S_IFMT != typ || unix.Major(st.Rdev) != major || unix.Minor(st.Rdev) != minor {
			t.Errorf("%s: mode %o rdev %d:%d, want type %o %d:%d", name, st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev), typ, major, minor)
		}
	}
}

func xattr(name, key, want string) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		buf := make([]byte, 256)
		n, err := unix.Lgetxattr(filepath.Join(layer, name), key, buf)
		if want == "" {
			if err == nil {
				t.Errorf("%s has xattr %s=%q, want none", name, key, buf[:n])
			}
			return
		}
		if err != nil || string(buf[:n]) != want {
			t.Errorf("%s xattr %s = %q, %v; want %q", name, key, buf[:max(n, 0)], err, want)
		}
	}
}

func missing(name string) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		if _, err := os.Lstat(filepath.Join(layer, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists (%v), want it absent", name, err)
		}
	}
}

func symlink(name, target string) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		if got, err := os.Readlink(filepath.Join(layer, name)); err != nil || got != target {
			t.Errorf("%s -> %q, %v; want %q", name, got, err, target)
		}
	}
}

func mtime(name string, want time.Time) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		st := lstat(t, filepath.Join(layer, name))
		if got := time.Unix(st.Mtim.Unix()); !got.Equal(want) {
			t.Errorf("%s mtime %v, want %v", name, got, want)
		}
	}
}

func sameInode(a, b string) check {
	return func(t *testing.T, layer string) {
		t.Helper()
		if sa, sb := lstat(t, filepath.Join(layer, a)), lstat(t, filepath.Join(layer, b)); sa.Ino != sb.Ino {
			t.Errorf("%s and %s are not one inode", a, b)
		}
	}
}

func TestTar(t *testing.T) {
	needRoot(t)
	t0 := lt.DefaultMTime
	t1 := t0.Add(time.Hour)
	tests := []struct {
		name    string
		entries []lt.Entry
		checks  []check
		wantErr bool
	}{
		{"metadata", []lt.Entry{
			lt.Dir("etc", lt.MTime(t1), lt.Mode(0o750), lt.Owner(3, 4)),
			lt.FileString("etc/suid", "s", lt.Mode(0o4755), lt.Owner(1000, 1001)),
			lt.FileString("etc/sgid", "g", lt.Mode(0o2711)),
			lt.Dir("tmp", lt.Mode(0o1777)),
			lt.FileString("etc/x", "x", lt.Xattr("user.a", "alpha"), lt.Xattr("trusted.overlay.opaque", "y"), lt.Xattr("user.overlay.redirect", "/x")),
			lt.Symlink("etc/link", "../etc/x"),
			lt.Hardlink("etc/hard", "etc/suid"),
			lt.Char("dev/null", 1, 3, lt.Mode(0o666)),
			lt.Block("dev/sda", 8, 0),
			lt.Fifo("dev/fifo"),
		}, []check{
			isFile("etc/suid", "s", 0o4755, 1000, 1001),
			isFile("etc/sgid", "g", 0o2711, 0, 0),
			isFile("etc/x", "x", 0o644, 0, 0),
			xattr("etc/x", "user.a", "alpha"),
			xattr("etc/x", "trusted.overlay.opaque", ""),
			xattr("etc/x", "user.overlay.redirect", ""),
			symlink("etc/link", "../etc/x"),
			sameInode("etc/suid", "etc/hard"),
			isNode("dev/null", unix.S_IFCHR, 1, 3),
			isNode("dev/sda", unix.S_IFBLK, 8, 0),
			isNode("dev/fifo", unix.S_IFIFO, 0, 0),
			isNode("tmp", unix.S_IFDIR, 0, 0),
			mtime("etc", t1),
			mtime("etc/x", t0),
			func(t *testing.T, l string) {
				if st := lstat(t, filepath.Join(l, "etc")); st.Mode&0o7777 != 0o750 || st.Uid != 3 || st.Gid != 4 {
					t.Errorf("etc: mode %o owner %d:%d", st.Mode, st.Uid, st.Gid)
				}
				if st := lstat(t, filepath.Join(l, "tmp")); st.Mode&0o7777 != 0o1777 {
					t.Errorf("tmp: mode %o", st.Mode)
				}
			},
		}, false},
		{"xattrs on the layer root", []lt.Entry{
			lt.Dir("./", lt.Mode(0o711), lt.Xattr("user.root", "r"), lt.Xattr("trusted.root", "t"), lt.Xattr("trusted.overlay.opaque", "y")),
			lt.FileString("f", "f"),
		}, []check{
			xattr("", "user.root", "r"),
			xattr("", "trusted.root", "t"),
			xattr("", "trusted.overlay.opaque", ""),
			isFile("f", "f", 0o644, 0, 0),
			func(t *testing.T, l string) {
				if st := lstat(t, l); st.Mode&0o7777 != 0o711 {
					t.Errorf("layer root: mode %o, want 711", st.Mode&0o7777)
				}
			},
		}, false},
		{"whiteouts", []lt.Entry{
			lt.Dir("a"),
			lt.Whiteout("a/gone"),
			lt.Whiteout("implied/gone"),
			lt.Dir("opq"),
			lt.Opaque("opq"),
			lt.FileString("opq/new", "n"),
			lt.Opaque("implied2"),
		}, []check{
			isNode("a/gone", unix.S_IFCHR, 0, 0),
			missing("a/.wh.gone"),
			isNode("implied/gone", unix.S_IFCHR, 0, 0),
			xattr("opq", "trusted.overlay.opaque", "y"),
			missing("opq/.wh..wh..opq"),
			isFile("opq/new", "n", 0o644, 0, 0),
			xattr("implied2", "trusted.overlay.opaque", "y"),
		}, false},
		{"file whiteouts for fuse-overlayfs", []lt.Entry{
			lt.Dir("a"),
			lt.FileString("a/gone", "replaced by its whiteout"),
			lt.Whiteout("a/gone"),
			lt.Dir("opq"),
			lt.Opaque("opq"),
		}, []check{
			isFile("a/.wh.gone", "", 0, 0, 0),
			missing("a/gone"),
			isFile("opq/.wh..wh..opq", "", 0, 0, 0),
			xattr("opq", "user.overlay.opaque", "y"),
			xattr("opq", "trusted.overlay.opaque", ""),
		}, false},
		{"later entries replace earlier ones", []lt.Entry{
			lt.FileString("f2d", "file"),
			lt.Dir("f2d"),
			lt.Dir("d2f"),
			lt.FileString("d2f/child", "c"),
			lt.FileString("d2f", "now a file"),
			lt.Dir("merge"),
			lt.FileString("merge/kept", "k"),
			lt.Dir("merge", lt.Mode(0o700)),
			lt.FileString("twice", "one"),
			lt.FileString("twice", "two"),
		}, []check{
			isNode("f2d", unix.S_IFDIR, 0, 0),
			isFile("d2f", "now a file", 0o644, 0, 0),
			isFile("merge/kept", "k", 0o644, 0, 0),
			isFile("twice", "two", 0o644, 0, 0),
		}, false},
		{"dot-dot and absolute names stay inside", []lt.Entry{
			lt.FileString("../../escape-dotdot", "x"),
			lt.FileString("/escape-abs", "x"),
			lt.FileString("a/../../../escape-mid", "x"),
		}, []check{
			isFile("escape-dotdot", "x", 0o644, 0, 0),
			isFile("escape-abs", "x", 0o644, 0, 0),
			isFile("escape-mid", "x", 0o644, 0, 0),
		}, false},
		{"symlinks out of the layer resolve inside it", []lt.Entry{
			lt.Symlink("abs", "/"),
			lt.Symlink("rel", "../../../.."),
			lt.FileString("abs/escape-abs-link", "x"),
			lt.FileString("rel/escape-rel-link", "x"),
			lt.Dir("tmp"),
			lt.Symlink("deep", "/tmp"),
			lt.FileString("deep/escape-deep", "x"),
		}, []check{
			symlink("abs", "/"),
			isFile("escape-abs-link", "x", 0o644, 0, 0),
			isFile("escape-rel-link", "x", 0o644, 0, 0),
			isFile("tmp/escape-deep", "x", 0o644, 0, 0),
		}, false},
		{"a symlink to a directory the layer lacks", []lt.Entry{
			lt.Symlink("deep", "/tmp"),
			lt.FileString("deep/escape-deep", "x"),
		}, nil, true},
		{"a final symlink is replaced, not written through", []lt.Entry{
			lt.Symlink("victim", "/escape-through"),
			lt.FileString("victim", "x"),
		}, []check{
			isFile("victim", "x", 0o644, 0, 0),
		}, false},
		{"hard link to outside the layer", []lt.Entry{
			lt.Hardlink("h", "../../../etc/passwd"),
		}, nil, true},
		{"hard link through a symlink to outside", []lt.Entry{
			lt.Symlink("etc", "/etc"),
			lt.Hardlink("h", "etc/passwd"),
		}, nil, true},
		{"hard link to a directory", []lt.Entry{
			lt.Dir("d"),
			lt.Hardlink("h", "d"),
		}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			outside := t.TempDir()
			layer := filepath.Join(outside, "a", "b", "layer")
			if err := os.MkdirAll(layer, 0o755); err != nil {
				t.Fatal(err)
			}
			var opts []Option
			if tt.name == "file whiteouts for fuse-overlayfs" {
				opts = []Option{WithFileWhiteouts(true), WithOpaqueXattr("user.overlay.opaque")}
			}
			err := Tar(bytes.NewReader(lt.Tar(tt.entries...)), layer, opts...)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Tar: %v, want error %v", err, tt.wantErr)
			}
			for _, c := range tt.checks {
				c(t, layer)
			}
			// Nothing was written outside the layer directory.
			filepath.WalkDir(outside, func(p string, d os.DirEntry, err error) error {
				if p == layer {
					return filepath.SkipDir
				}
				if p != outside && p != filepath.Join(outside, "a") && p != filepath.Join(outside, "a", "b") {
					t.Errorf("written outside the layer: %s", p)
				}
				return nil
			})
			for _, p := range []string{"/escape-through", "/escape-abs-link", "/tmp/escape-deep"} {
				if _, err := os.Lstat(p); err == nil {
					t.Errorf("written outside the layer: %s", p)
				}
			}
		})
	}
}

func gzipped(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func gunzip(r io.Reader) (io.ReadCloser, error) { return gzip.NewReader(r) }

func TestStore(t *testing.T) {
	needRoot(t)
	blob := gzipped(t, lt.Tar(lt.Dir("etc"), lt.FileString("etc/motd", "hi\n")))
	dgst := digestOf(blob)
	var opens atomic.Int32
	open := func(data []byte) func(context.Context) (io.ReadCloser, error) {
		return func(context.Context) (io.ReadCloser, error) {
			opens.Add(1)
			time.Sleep(50 * time.Millisecond) // let concurrent callers pile up
			return io.NopCloser(bytes.NewReader(data)), nil
		}
	}

	t.Run("concurrent callers share one unpack", func(t *testing.T) {
		s := NewStore(t.TempDir())
		opens.Store(0)
		var wg sync.WaitGroup
		dirs := make([]string, 4)
		for i := range dirs {
			wg.Go(func() {
				d, err := s.Layer(context.Background(), dgst, open(blob), gunzip)
				if err != nil {
					t.Error(err)
				}
				dirs[i] = d
			})
		}
		wg.Wait()
		if n := opens.Load(); n != 1 {
			t.Errorf("blob opened %d times, want 1", n)
		}
		want, _ := s.Path(dgst)
		for _, d := range dirs {
			if d != want {
				t.Errorf("dir %q, want %q", d, want)
			}
		}
		if b, err := os.ReadFile(filepath.Join(want, "etc/motd")); err != nil || string(b) != "hi\n" {
			t.Errorf("motd = %q, %v", b, err)
		}
		// Reused without a fetch.
		if _, err := s.Layer(context.Background(), dgst, open(blob), gunzip); err != nil || opens.Load() != 1 {
			t.Errorf("second Layer: %v, opens %d", err, opens.Load())
		}
	})
	t.Run("tampered blob", func(t *testing.T) {
		cache := t.TempDir()
		s := NewStore(cache)
		other := gzipped(t, lt.Tar(lt.FileString("evil", "x")))
		_, err := s.Layer(context.Background(), dgst, open(other), gunzip)
		if !errors.Is(err, ErrDigest) {
			t.Fatalf("Layer of a tampered blob: %v, want ErrDigest", err)
		}
		ents, _ := os.ReadDir(filepath.Join(cache, "layers", "sha256"))
		for _, e := range ents {
			if e.IsDir() {
				t.Errorf("left behind: %s", e.Name())
			}
		}
	})
	t.Run("leftovers of a crashed unpack are removed", func(t *testing.T) {
		s := NewStore(t.TempDir())
		final, _ := s.Path(dgst)
		stale := final + ".tmp-123"
		os.MkdirAll(filepath.Join(stale, "half"), 0o755)
		if _, err := s.Layer(context.Background(), dgst, open(blob), gunzip); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(stale); err == nil {
			t.Errorf("stale %s left", stale)
		}
	})
	t.Run("trailing bytes count", func(t *testing.T) {
		s := NewStore(t.TempDir())
		padded := append(append([]byte{}, blob...), 0) // gzip refuses the trailing garbage
		if _, err := s.Layer(context.Background(), digestOf(padded), open(padded), gunzip); err == nil {
			t.Errorf("blob with trailing garbage accepted")
		}
	})
	t.Run("bad digest", func(t *testing.T) {
		s := NewStore(t.TempDir())
		if _, err := s.Layer(context.Background(), "sha256:../../x", open(blob), gunzip); err == nil {
			t.Errorf("malformed digest accepted")
		}
	})
}

// TestStoreForms: stores unpacking for different overlays (kernel
// overlayfs as root, fuse-overlayfs without root) in one cache dir keep
// their own copy of a layer, each in its form.
func TestStoreForms(t *testing.T) {
	needRoot(t)
	blob := gzipped(t, lt.Tar(lt.Dir("d"), lt.Whiteout("d/gone"), lt.Dir("o"), lt.Opaque("o")))
	dgst := digestOf(blob)
	cache := t.TempDir()
	open := func(context.Context) (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(blob)), nil }
	tests := []struct {
		name   string
		opts   []Option
		checks []check
	}{
		{"kernel overlayfs", nil, []check{
			isNode("d/gone", unix.S_IFCHR, 0, 0),
			xattr("o", "trusted.overlay.opaque", "y"),
			xattr("o", "user.overlay.opaque", ""),
		}},
		{"fuse-overlayfs unprivileged", []Option{WithFileWhiteouts(true), WithOpaqueXattr("user.overlay.opaque")}, []check{
			isFile("d/.wh.gone", "", 0, 0, 0),
			missing("d/gone"),
			xattr("o", "user.overlay.opaque", "y"),
			xattr("o", "trusted.overlay.opaque", ""),
		}},
	}
	seen := map[string]bool{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewStore(cache, tt.opts...)
			dir, err := s.Layer(context.Background(), dgst, open, gunzip)
			if err != nil {
				t.Fatal(err)
			}
			if seen[dir] {
				t.Fatalf("%s is shared with another form", dir)
			}
			seen[dir] = true
			for _, c := range tt.checks {
				c(t, dir)
			}
			if ls, err := s.Layers(); err != nil || len(ls) != 1 || ls[0].Digest != dgst {
				t.Errorf("Layers = %v, %v; want just %s", ls, err, dgst)
			}
		})
	}
	// The kernel overlayfs form stays where earlier versions put it.
	if !seen[filepath.Join(cache, "layers", "sha256", dgst[len("sha256:"):])] {
		t.Errorf("kernel overlayfs form not in layers/sha256: %v", seen)
	}
}

// BenchmarkStore measures fetch-free unpacking of a gzip layer of 64 MiB in
// 1 MiB files plus 2000 small files: digest check, gunzip and writes.
func BenchmarkStore(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	entries := []lt.Entry{lt.Dir("big"), lt.Dir("small")}
	for i := range 64 {
		entries = append(entries, lt.File(fmt.Sprintf("big/%02d", i), lt.Random(fmt.Sprint(i), 1<<20)))
	}
	for i := range 2000 {
		entries = append(entries, lt.FileString(fmt.Sprintf("small/%04d", i), "small file\n"))
	}
	tarBytes := lt.Tar(entries...)
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(tarBytes)
	zw.Close()
	blob := buf.Bytes()
	dgst := digestOf(blob)
	b.SetBytes(int64(len(tarBytes)))
	b.ResetTimer()
	for range b.N {
		s := NewStore(b.TempDir())
		if _, err := s.Layer(context.Background(), dgst, func(context.Context) (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(blob)), nil
		}, gunzip); err != nil {
			b.Fatal(err)
		}
	}
}

func TestStoreHoldPrune(t *testing.T) {
	needRoot(t)
	s := NewStore(t.TempDir())
	var dgsts []string
	for i := range 3 {
		blob := gzipped(t, lt.Tar(lt.File(fmt.Sprint(i), lt.Random(fmt.Sprint(i), 64<<10))))
		d := digestOf(blob)
		release, err := s.Hold(d)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Layer(context.Background(), d, func(context.Context) (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(blob)), nil
		}, gunzip); err != nil {
			t.Fatal(err)
		}
		if i != 1 {
			release()
		} else {
			t.Cleanup(release)
		}
		dgsts = append(dgsts, d)
		time.Sleep(20 * time.Millisecond) // distinct last-use times
	}
	ls, err := s.Layers()
	if err != nil || len(ls) != 3 {
		t.Fatalf("Layers = %v, %v", ls, err)
	}
	for i, l := range ls {
		if l.Digest != dgsts[i] || l.InUse != (i == 1) || l.Bytes < 64<<10 {
			t.Errorf("layer %d = %+v", i, l)
		}
	}
	var sum int64
	for _, l := range ls {
		sum += l.Bytes
	}
	if u, err := s.Usage(); err != nil || u != sum {
		t.Errorf("Usage = %d, %v; want %d, the layers' sum", u, err, sum)
	}
	if _, err := s.Remove(dgsts[1]); !errors.Is(err, ErrBusy) {
		t.Errorf("Remove of a held layer: %v", err)
	}
	// Down to one layer's worth: the oldest unheld goes first, then the
	// next unheld; the held one stays.
	freed, err := s.Prune(ls[1].Bytes)
	if err != nil || freed < 2*(64<<10) {
		t.Errorf("Prune freed %d, %v", freed, err)
	}
	ls, _ = s.Layers()
	if len(ls) != 1 || ls[0].Digest != dgsts[1] {
		t.Errorf("after Prune: %+v", ls)
	}
}
