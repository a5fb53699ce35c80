package layertest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	digest "github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

func TestTarRoundTrip(t *testing.T) {
	mt := time.Date(2020, 5, 6, 7, 8, 9, 999, time.UTC)
	long := strings.Repeat("x", 120) + "/" + strings.Repeat("y", 200)
	entries := []Entry{
		Dir("d", Mode(0o1777), Owner(1, 2)),
		FileString("d/f", "hello", Mode(0o4755), Owner(1000, 1001), MTime(mt), Xattr("user.a", "1"), Xattr("user.b", "2")),
		File("d/empty", nil),
		Symlink("d/s", "../target"),
		Hardlink("d/h", "d/f"),
		Char("c", 1, 3),
		Block("b", 8, 0),
		Fifo("p", Mode(0o600)),
		Whiteout("d/gone"),
		Opaque("d"),
		FileString(long, "long"),
		Symlink("longlink", long),
		FileString("big-ids", "", Owner(3000000, 65534)),
	}
	data := Tar(entries...)
	if !bytes.Equal(data, Tar(entries...)) {
		t.Error("Tar is not deterministic")
	}
	tr := tar.NewReader(bytes.NewReader(data))
	for i, e := range entries {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		body, _ := io.ReadAll(tr)
		w := e.Header
		if h.Name != w.Name || h.Typeflag != w.Typeflag || h.Mode != w.Mode || h.Uid != w.Uid || h.Gid != w.Gid ||
			h.Linkname != w.Linkname || h.Devmajor != w.Devmajor || h.Devminor != w.Devminor ||
			!h.ModTime.Equal(w.ModTime) || !bytes.Equal(body, e.Body) {
			t.Errorf("entry %d: got %+v body %q, want %+v body %q", i, h, body, w, e.Body)
		}
		for k, v := range w.PAXRecords {
			if h.PAXRecords[k] != v {
				t.Errorf("%s: PAX %s = %q, want %q", h.Name, k, h.PAXRecords[k], v)
			}
		}
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Errorf("trailing entry: %v", err)
	}

	// Spot-check the constructors.
	for i, want := range map[int]string{0: "d/", 8: "d/.wh.gone", 9: "d/.wh..wh..opq"} {
		if got := entries[i].Header.Name; got != want {
			t.Errorf("entry %d: name %q, want %q", i, got, want)
		}
	}
	if got := entries[1].Header.ModTime; !got.Equal(mt.Truncate(time.Second)) {
		t.Errorf("MTime kept sub-seconds: %v", got)
	}
	if m := entries[8].Header; m.Typeflag != tar.TypeReg || m.Mode != 0 {
		t.Errorf("whiteout header %+v", m)
	}
}

func TestCorpusWellFormed(t *testing.T) {
	layers := Corpus()
	if len(layers) < 3 {
		t.Fatalf("%d layers", len(layers))
	}
	for i, layer := range layers {
		seen := map[string]byte{}
		for _, e := range layer {
			h := e.Header
			name := strings.TrimSuffix(h.Name, "/")
			if dir := path.Dir(name); dir != "." && seen[dir] != tar.TypeDir {
				t.Errorf("layer %d: %q precedes its directory", i, h.Name)
			}
			if h.Typeflag == tar.TypeLink && seen[h.Linkname] != tar.TypeReg {
				t.Errorf("layer %d: hard link %q precedes its target %q", i, h.Name, h.Linkname)
			}
			if _, dup := seen[name]; dup {
				t.Errorf("layer %d: duplicate %q", i, name)
			}
			if h.ModTime.Nanosecond() != 0 {
				t.Errorf("layer %d: %q has sub-second mtime", i, h.Name)
			}
			seen[name] = h.Typeflag
		}
	}
	if !bytes.Equal(Tar(Corpus()[0]...), Tar(layers[0]...)) ||
		!bytes.Equal(Random("x", 100), Random("x", 100)) || bytes.Equal(Random("x", 100), Random("y", 100)) {
		t.Error("corpus content is not deterministic")
	}
	if len(LongPath) <= 255 || len(path.Base(LongName)) <= 100 {
		t.Error("long names are too short")
	}
	big := BigFileLayer(3 << 20)
	if got := big[len(big)-1]; got.Header.Name != BigFileName || len(got.Body) != 3<<20 {
		t.Errorf("big file entry %q, %d bytes", got.Header.Name, len(got.Body))
	}
}

func TestImage(t *testing.T) {
	img, err := BuildImage(CorpusChunkSize, Corpus()...)
	if err != nil {
		t.Fatal(err)
	}
	again, err := BuildImage(CorpusChunkSize, Corpus()...)
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("image digest not reproducible: %s vs %s", d1, d2)
	}

	reg := InProcessRegistry(t)
	ref := reg + "/corpus:latest"
	Push(t, img, ref)
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	pulled, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	m, err := pulled.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pulled.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON {
		t.Errorf("media types %s, %s", m.MediaType, m.Config.MediaType)
	}
	if cfg.OS != "linux" || cfg.Architecture == "" || len(cfg.Config.Cmd) == 0 || cfg.Config.WorkingDir == "" {
		t.Errorf("config %+v", cfg)
	}
	if len(m.Layers) != len(Corpus()) || len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		t.Fatalf("%d layers, %d diff_ids", len(m.Layers), len(cfg.RootFS.DiffIDs))
	}
	layers, err := pulled.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for i, desc := range m.Layers {
		if desc.MediaType != types.OCILayer {
			t.Errorf("layer %d media type %s", i, desc.MediaType)
		}
		blob := readLayer(t, layers[i])
		// The diff_id must be the digest of the decompressed blob.
		zr, err := gzip.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatal(err)
		}
		diffID, size, err := v1.SHA256(zr)
		if err != nil {
			t.Fatal(err)
		}
		if diffID != cfg.RootFS.DiffIDs[i] {
			t.Errorf("layer %d: diff_id %s, config says %s", i, diffID, cfg.RootFS.DiffIDs[i])
		}
		if got := desc.Annotations[UncompressedSizeAnnotation]; got != strconv.FormatInt(size, 10) {
			t.Errorf("layer %d: uncompressed size annotation %q, want %d", i, got, size)
		}
		// The TOC digest annotation must verify against the blob's TOC.
		sr := io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob)))
		er, err := estargz.Open(sr)
		if err != nil {
			t.Fatalf("layer %d: estargz.Open: %v", i, err)
		}
		if _, err := er.VerifyTOC(digest.Digest(desc.Annotations[TOCDigestAnnotation])); err != nil {
			t.Errorf("layer %d: VerifyTOC: %v", i, err)
		}
	}

	plain, err := BuildGzipImage(Corpus()[0])
	if err != nil {
		t.Fatal(err)
	}
	pm, _ := plain.Manifest()
	pl, _ := plain.Layers()
	blob := readLayer(t, pl[0])
	if len(pm.Layers[0].Annotations) != 0 || pm.Layers[0].MediaType != types.OCILayer {
		t.Errorf("plain layer descriptor %+v", pm.Layers[0])
	}
	if _, err := estargz.Open(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob)))); err == nil {
		t.Error("plain gzip layer opens as eStargz")
	}
}

func readLayer(t *testing.T, l v1.Layer) []byte {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// treeFixedTime is the mtime makeTree gives every path.
var treeFixedTime = time.Date(2023, 3, 4, 5, 6, 7, 0, time.UTC)

// makeTree builds a small tree, applies change, then pins all mtimes.
func makeTree(t *testing.T, change func(dir string) error) string {
	t.Helper()
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(filepath.Join(dir, "d"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "f"), []byte("hello"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "d/g"), []byte("world"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "h1"), []byte("linked"), 0o644))
	must(os.Link(filepath.Join(dir, "h1"), filepath.Join(dir, "d/h2")))
	must(os.WriteFile(filepath.Join(dir, "solo"), []byte("linked"), 0o644))
	must(os.Symlink("f", filepath.Join(dir, "l")))
	must(unix.Mkfifo(filepath.Join(dir, "p"), 0o644))
	if os.Geteuid() == 0 {
		must(unix.Mknod(filepath.Join(dir, "c"), unix.S_IFCHR|0o644, int(unix.Mkdev(1, 3))))
	}
	if err := unix.Lsetxattr(filepath.Join(dir, "f"), "user.x", []byte("1"), 0); errors.Is(err, unix.ENOTSUP) {
		t.Skip("no user xattrs on this filesystem")
	} else {
		must(err)
	}
	if change != nil {
		must(change(dir))
	}
	must(filepath.WalkDir(dir, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		ts := []unix.Timespec{unix.NsecToTimespec(treeFixedTime.UnixNano()), unix.NsecToTimespec(treeFixedTime.UnixNano())}
		return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
	}))
	return dir
}

func TestCompareTrees(t *testing.T) {
	base := makeTree(t, nil)
	if d := CompareTrees(base, makeTree(t, nil)); len(d) != 0 {
		t.Fatalf("identical trees differ: %q", d)
	}
	j := filepath.Join
	cases := []struct {
		name   string
		root   bool // needs root
		change func(dir string) error
		want   []string // substrings, one per expected difference
	}{
		{"missing", false, func(d string) error { return os.Remove(j(d, "d/g")) }, []string{"d/g: missing"}},
		{"extra", false, func(d string) error { return os.WriteFile(j(d, "new"), nil, 0o644) }, []string{"new: extra"}},
		{"type", false, func(d string) error {
			return errors.Join(os.Remove(j(d, "solo")), os.Mkdir(j(d, "solo"), 0o755))
		}, []string{"solo: type: want regular file, got directory"}},
		{"mode", false, func(d string) error { return os.Chmod(j(d, "f"), 0o600) }, []string{"f: mode: want 0644, got 0600"}},
		{"setuid", false, func(d string) error { return unix.Chmod(j(d, "f"), 0o4644) }, []string{"f: mode: want 0644, got 4644"}},
		{"setgid", false, func(d string) error { return unix.Chmod(j(d, "d"), 0o2755) }, []string{"d: mode: want 0755, got 2755"}},
		{"sticky", false, func(d string) error { return unix.Chmod(j(d, "d"), 0o1755) }, []string{"d: mode: want 0755, got 1755"}},
		{"uid", true, func(d string) error { return os.Lchown(j(d, "l"), 1000, -1) }, []string{"l: uid: want 0, got 1000"}},
		{"gid", true, func(d string) error { return os.Chown(j(d, "f"), -1, 1001) }, []string{"f: gid: want 0, got 1001"}},
		{"size", false, func(d string) error { return os.WriteFile(j(d, "f"), []byte("hello!"), 0o644) }, []string{"f: size: want 5, got 6"}},
		{"content", false, func(d string) error { return os.WriteFile(j(d, "f"), []byte("HELLO"), 0o644) }, []string{"f: sha256: want 2cf24dba"}},
		{"symlink", false, func(d string) error {
			return errors.Join(os.Remove(j(d, "l")), os.Symlink("d/g", j(d, "l")))
		}, []string{"l: symlink target: want f, got d/g"}},
		{"rdev", true, func(d string) error {
			return errors.Join(os.Remove(j(d, "c")), unix.Mknod(j(d, "c"), unix.S_IFCHR|0o644, int(unix.Mkdev(1, 5))))
		}, []string{"c: rdev: want 1:3, got 1:5"}},
		{"xattr value", false, func(d string) error { return unix.Lsetxattr(j(d, "f"), "user.x", []byte("2"), 0) },
			[]string{`f: xattr user.x: want "1", got "2"`}},
		{"xattr missing", false, func(d string) error { return unix.Lremovexattr(j(d, "f"), "user.x") },
			[]string{"f: xattr user.x: missing"}},
		{"xattr extra", false, func(d string) error { return unix.Lsetxattr(j(d, "d"), "user.y", []byte("v"), 0) },
			[]string{"d: xattr user.y: extra"}},
		{"hardlink split", false, func(d string) error {
			return errors.Join(os.Remove(j(d, "d/h2")), os.WriteFile(j(d, "d/h2"), []byte("linked"), 0o644))
		}, []string{`d/h2: hard links: want ["d/h2" "h1"], got ["d/h2"]`, `h1: hard links: want ["d/h2" "h1"], got ["h1"]`}},
		{"hardlink joined", false, func(d string) error {
			return errors.Join(os.Remove(j(d, "solo")), os.Link(j(d, "h1"), j(d, "solo")))
		}, []string{`d/h2: hard links: want ["d/h2" "h1"], got ["d/h2" "h1" "solo"]`, `solo: hard links: want ["solo"]`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.root && os.Geteuid() != 0 {
				t.Skip("needs root")
			}
			diffs := CompareTrees(base, makeTree(t, c.change))
			if !matchAll(diffs, c.want) {
				t.Errorf("got %q, want one match each for %q", diffs, c.want)
			}
			// Swapping the roots must still find the difference.
			if rev := CompareTrees(makeTree(t, c.change), base); len(rev) != len(c.want) {
				t.Errorf("reversed: got %q", rev)
			}
		})
	}

	t.Run("mtime", func(t *testing.T) {
		got := makeTree(t, nil)
		later := []unix.Timespec{unix.NsecToTimespec(0), unix.NsecToTimespec(treeFixedTime.Add(time.Second).UnixNano())}
		for _, p := range []string{"d", "l", "p"} {
			if err := unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(got, p), later, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				t.Fatal(err)
			}
		}
		want := []string{"d: mtime: want 2023-03-04T05:06:07Z, got 2023-03-04T05:06:08Z", "l: mtime", "p: mtime"}
		if diffs := CompareTrees(base, got); !matchAll(diffs, want) {
			t.Errorf("got %q, want %q", diffs, want)
		}
	})

	t.Run("ignore", func(t *testing.T) {
		got := makeTree(t, func(d string) error {
			return errors.Join(os.WriteFile(j(d, "stargz.index.json"), nil, 0), os.Mkdir(j(d, ".prefetch.landmark"), 0o755),
				os.WriteFile(j(d, "d/stargz.index.json"), nil, 0))
		})
		want := []string{"d/stargz.index.json: extra"} // only root-level names are ignored
		if diffs := CompareTrees(base, got, FormatFiles...); !matchAll(diffs, want) {
			t.Errorf("got %q, want %q", diffs, want)
		}
	})
}

// matchAll reports whether diffs and want pair up one to one, each diff
// containing its substring.
func matchAll(diffs, want []string) bool {
	if len(diffs) != len(want) {
		return false
	}
	for _, w := range want {
		if !slices.ContainsFunc(diffs, func(d string) bool { return strings.Contains(d, w) }) {
			return false
		}
	}
	return true
}

// TestCorpusUmoci pushes the corpus to the distribution registry, unpacks it
// with umoci and checks facts the lazy mount will be held to.
func TestCorpusUmoci(t *testing.T) {
	img, err := BuildImage(CorpusChunkSize, Corpus()...)
	if err != nil {
		t.Fatal(err)
	}
	reg := DistributionRegistry(t)
	ref := reg.Addr + "/layertest/corpus:v1"
	Push(t, img, ref)
	root := UmociRootfs(t, ref)

	m, _ := img.Manifest()
	if _, err := os.Stat(reg.BlobPath(m.Layers[0].Digest.String())); err != nil {
		t.Errorf("BlobPath: %v", err)
	}

	for _, p := range []string{"wh-file", "data/del", "gone/inner", "gone/top", "opq/old", "opq/sub", "d2f/child"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err == nil {
			t.Errorf("%s: want absent", p)
		}
	}
	files := map[string]string{
		"recreate": "second version\n", "gone/new": "recreated directory\n", "opq/new": "only file left\n",
		"d2f": "was a directory\n", "f2d/inside": "was a file\n", "data/keep": "kept\n", "data/added": "new in layer 1\n",
	}
	for _, p := range slices.Sorted(maps.Keys(files)) {
		if b, err := os.ReadFile(filepath.Join(root, p)); err != nil || string(b) != files[p] {
			t.Errorf("%s: %q, %v", p, b, err)
		}
	}
	st := func(p string) *unix.Stat_t {
		var s unix.Stat_t
		if err := unix.Lstat(filepath.Join(root, p), &s); err != nil {
			t.Fatal(err)
		}
		return &s
	}
	if a, b, c, x := st("hard/a"), st("hard/b"), st("hard/sub/c"), st("hard/x"); a.Ino != b.Ino || a.Ino != c.Ino || a.Ino == x.Ino || a.Nlink != 3 {
		t.Errorf("hard link inodes %d %d %d %d, nlink %d", a.Ino, b.Ino, c.Ino, x.Ino, a.Nlink)
	}
	if s := st("dev/null"); s.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(s.Rdev) != 1 || unix.Minor(s.Rdev) != 3 {
		t.Errorf("dev/null mode %o rdev %x", s.Mode, s.Rdev)
	}
	if s := st("dev/sda"); s.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(s.Rdev) != 8 || s.Gid != 6 {
		t.Errorf("dev/sda mode %o rdev %x gid %d", s.Mode, s.Rdev, s.Gid)
	}
	if s := st("meta"); s.Mode&0o7777 != 0o600 || s.Uid != 1000 || s.Gid != 1001 {
		t.Errorf("meta mode %o owner %d:%d", s.Mode, s.Uid, s.Gid)
	}
	if s := st("modes/both"); s.Mode&0o7777 != 0o6755 {
		t.Errorf("modes/both mode %o", s.Mode)
	}
	if s := st("modes/sticky"); s.Mode&0o7777 != 0o1777 {
		t.Errorf("modes/sticky mode %o", s.Mode)
	}
	if s := st("gone"); s.Mtim.Sec != DefaultMTime.Add(48*time.Hour).Unix() {
		t.Errorf("gone mtime %v: umoci no longer restores directory mtimes", time.Unix(s.Mtim.Sec, 0))
	}
	xs, err := userXattrs(filepath.Join(root, "xattr/many"))
	if err != nil || xs["user.a"] != "alpha" || xs["user.b"] != "beta" || len(xs["user.long"]) != 1000 {
		t.Errorf("xattr/many xattrs %q, %v", xs, err)
	}
	if ents, err := os.ReadDir(filepath.Join(root, "many")); err != nil || len(ents) != 3000 {
		t.Errorf("many/: %d entries, %v", len(ents), err)
	}
	if b, err := os.ReadFile(filepath.Join(root, LongPath)); err != nil || string(b) != "long path\n" {
		t.Errorf("long path: %q, %v", b, err)
	}
	// umoci leaves the eStargz metadata files in the rootfs.
	if _, err := os.Lstat(filepath.Join(root, "stargz.index.json")); err != nil {
		t.Errorf("stargz.index.json: %v", err)
	}

	// The same image through the in-process registry unpacks identically.
	ref2 := InProcessRegistry(t) + "/corpus:latest"
	Push(t, img, ref2)
	if d := CompareTrees(root, UmociRootfs(t, ref2)); len(d) != 0 {
		t.Errorf("rootfs from the two registries differ: %q", d)
	}
}

func TestDebianTar(t *testing.T) {
	b := DebianTar(t)
	tr := tar.NewReader(bytes.NewReader(b))
	seen := map[string]*tar.Header{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(h.Name, "./") || strings.HasPrefix(h.Name, "/") {
			t.Errorf("entry %q is not root-relative", h.Name)
		}
		seen[strings.TrimSuffix(h.Name, "/")] = h
	}
	for _, want := range []string{"etc/debian_version", "etc/passwd", "usr/bin/bash", "usr/bin/id"} {
		if seen[want] == nil {
			t.Errorf("%s missing from the Debian rootfs", want)
		}
	}
	if h := seen["dev/null"]; h == nil || h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 {
		t.Errorf("dev/null = %+v, want char 1:3", h)
	}
	if len(seen) < 1000 {
		t.Errorf("only %d entries: not a Debian rootfs", len(seen))
	}
}
