package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

// storedLayers lists the unpacked layer directories in the env's store.
func (e *env) storedLayers() []string {
	ents, _ := os.ReadDir(filepath.Join(e.cache, "layers", "sha256"))
	var out []string
	for _, d := range ents {
		if d.IsDir() {
			out = append(out, d.Name())
		}
	}
	return out
}

// fuseMounts counts the FUSE layer mounts the env's live stacks use.
func (e *env) fuseMounts() int {
	// A lower is a FUSE mount point in the state dir (a private layer) or
	// a link to one (a shared layer mount, see e2e_shared_test.go).
	lowers, _ := filepath.Glob(filepath.Join(e.cache, "m", "*", "[0-9]*"))
	seen := map[string]bool{}
	for _, l := range lowers {
		if d, err := os.Readlink(l); err == nil {
			l = d
		}
		if !seen[l] && fuseMountsAt(e.t, l) > 0 {
			seen[l] = true
		}
	}
	return len(seen)
}

// TestFormatsMatchUmoci mounts the corpus built in every layer format and
// compares each mount with umoci's rootfs of the same image.
func TestFormatsMatchUmoci(t *testing.T) {
	needFUSE(t)
	reg := lt.DistributionRegistry(t)
	layers := lt.Corpus()
	tests := []struct {
		name      string
		formats   []lt.Format
		wantFUSE  int // lazily served layers
		wantDirs  int // unpacked layers
		umociZstd bool
	}{
		{"gzip", []lt.Format{lt.FormatGzip}, 0, 3, false},
		{"zstd", []lt.Format{lt.FormatZstd}, 0, 3, true},
		{"uncompressed", []lt.Format{lt.FormatUncompressed}, 0, 3, false},
		{"zstd-chunked", []lt.Format{lt.FormatZstdChunked}, 3, 0, true},
		{"mixed", []lt.Format{lt.FormatGzip, lt.FormatEStargz, lt.FormatZstdChunked}, 2, 1, true},
		{"mixed-plain-zstd", []lt.Format{lt.FormatZstd, lt.FormatEStargz, lt.FormatGzip}, 1, 2, true},
		{"mixed-estargz-base", []lt.Format{lt.FormatEStargz, lt.FormatUncompressed, lt.FormatEStargz}, 2, 1, false},
	}
	// umoci 0.4.7 (Debian) cannot unpack zstd layers; the reference for
	// an image with zstd layers is umoci's rootfs of the same tars in gzip.
	gzipRef := reg.Addr + "/corpus-gzip:latest"
	gz, err := lt.BuildImageAs(lt.CorpusChunkSize, []lt.Format{lt.FormatGzip}, layers...)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, gz, gzipRef)
	gzipRootfs := lt.UmociRootfs(t, gzipRef)

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, err := lt.BuildImageAs(lt.CorpusChunkSize, tt.formats, layers...)
			if err != nil {
				t.Fatal(err)
			}
			ref := reg.Addr + "/corpus-" + tt.name + ":latest"
			lt.Push(t, img, ref)
			want := gzipRootfs
			if !tt.umociZstd {
				want = lt.UmociRootfs(t, ref)
			}
			e := newEnv(t)
			e.mount(ref)
			if diffs := lt.CompareTrees(want, e.target, lt.FormatFiles...); len(diffs) > 0 {
				t.Errorf("%d differences between umoci's rootfs and the mount:\n%s", len(diffs), strings.Join(diffs, "\n"))
			}
			if n := e.fuseMounts(); n != tt.wantFUSE {
				t.Errorf("%d FUSE layer mounts, want %d", n, tt.wantFUSE)
			}
			if n := len(e.storedLayers()); n != tt.wantDirs {
				t.Errorf("%d unpacked layers, want %d", n, tt.wantDirs)
			}
			e.umount()
			e.assertClean()
			// The unpacked layers stay for the next mount, which fetches
			// nothing for them.
			if n := len(e.storedLayers()); n != tt.wantDirs {
				t.Errorf("after umount: %d unpacked layers, want %d", n, tt.wantDirs)
			}
		})
	}
}

// TestDockerSchema2MatchesUmoci mounts the corpus as an image with Docker
// schema2 media types (manifest, config and layers: plain gzip, eStargz and
// uncompressed) from Debian's registry and compares it with umoci's rootfs
// of the same image.
func TestDockerSchema2MatchesUmoci(t *testing.T) {
	needFUSE(t)
	reg := lt.DistributionRegistry(t)
	img, err := lt.BuildDockerImageAs(lt.CorpusChunkSize,
		[]lt.Format{lt.FormatGzip, lt.FormatEStargz, lt.FormatUncompressed}, lt.Corpus()...)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Addr + "/corpus-docker:latest"
	lt.Push(t, img, ref)

	// The registry serves it as pushed: Docker media types throughout.
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(r)
	if err != nil {
		t.Fatal(err)
	}
	m, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil {
		t.Fatal(err)
	}
	if desc.MediaType != types.DockerManifestSchema2 || m.Config.MediaType != types.DockerConfigJSON {
		t.Fatalf("served as %s with config %s, want Docker schema2", desc.MediaType, m.Config.MediaType)
	}
	wantTypes := []types.MediaType{types.DockerLayer, types.DockerLayer, types.DockerUncompressedLayer}
	for i, l := range m.Layers {
		if l.MediaType != wantTypes[i] {
			t.Errorf("layer %d is %s, want %s", i, l.MediaType, wantTypes[i])
		}
	}
	if m.Layers[1].Annotations[lt.TOCDigestAnnotation] == "" {
		t.Fatal("the eStargz layer lost its TOC digest annotation")
	}

	want := lt.UmociRootfs(t, ref)
	e := newEnv(t)
	e.mount(ref)
	if diffs := lt.CompareTrees(want, e.target, lt.FormatFiles...); len(diffs) > 0 {
		t.Errorf("%d differences between umoci's rootfs and the mount:\n%s", len(diffs), strings.Join(diffs, "\n"))
	}
	if n := e.fuseMounts(); n != 1 {
		t.Errorf("%d FUSE layer mounts, want 1 (the eStargz layer)", n)
	}
	if n := len(e.storedLayers()); n != 2 {
		t.Errorf("%d unpacked layers, want 2", n)
	}
	e.umount()
	e.assertClean()
}

// TestPlainLayerShared mounts one plain image twice at once: both share one
// unpacked copy of each layer.
func TestPlainLayerShared(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	img, err := lt.BuildImageAs(0, []lt.Format{lt.FormatGzip},
		[]lt.Entry{lt.Dir("etc"), lt.FileString("etc/motd", "base\n")},
		[]lt.Entry{lt.Dir("etc"), lt.FileString("etc/motd", "top\n")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/shared:1")
	e1 := newEnv(t)
	e2 := &env{t: t, cache: e1.cache, target: filepath.Join(t.TempDir(), "mnt2")}
	os.Mkdir(e2.target, 0o755)
	t.Cleanup(func() {
		if mounted(e2.target) {
			exec.Command(binary, "umount", e2.target).Run()
		}
	})
	errs := make(chan error, 2)
	for _, e := range []*env{e1, e2} {
		go func() {
			out, err := e.cmd("--daemon", host+"/shared:1", e.target).CombinedOutput()
			if err != nil {
				err = fmt.Errorf("%v: %s", err, out)
			}
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range []*env{e1, e2} {
		if b, err := os.ReadFile(filepath.Join(e.target, "etc/motd")); err != nil || string(b) != "top\n" {
			t.Errorf("%s: motd = %q, %v", e.target, b, err)
		}
	}
	if n := len(e1.storedLayers()); n != 2 {
		t.Errorf("%d unpacked layers, want 2", n)
	}
	e2.umount()
	e1.umount()
	e1.assertClean()
}

// TestMultiArch mounts an index with and without --platform.
func TestMultiArch(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	other := "s390x"
	if runtime.GOARCH == other {
		other = "arm64"
	}
	build := func(arch, content string, f lt.Format) v1.Image {
		img, err := lt.BuildImageAs(64<<10, []lt.Format{f}, []lt.Entry{lt.FileString("arch", content)})
		if err != nil {
			t.Fatal(err)
		}
		cf, _ := img.ConfigFile()
		cf = cf.DeepCopy()
		cf.Architecture = arch
		img, err = mutate.ConfigFile(img, cf)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: build(other, "other", lt.FormatGzip),
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: other}}},
		mutate.IndexAddendum{Add: build(runtime.GOARCH, "host", lt.FormatEStargz),
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}},
	)
	r, err := name.ParseReference(host + "/multi:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		flags []string
		want  string // content of /arch, or "" for an error
	}{
		{"host platform by default", nil, "host"},
		{"--platform picks another", []string{"--platform", "linux/" + other}, "other"},
		{"--platform of the host", []string{"--platform", "linux/" + runtime.GOARCH}, "host"},
		{"--platform missing from the index", []string{"--platform", "linux/mips64le"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			if tt.want == "" {
				out, err := e.cmd(append(tt.flags, "--daemon", host+"/multi:1", e.target)...).CombinedOutput()
				if err == nil || !strings.Contains(string(out), "linux/mips64le") {
					t.Errorf("mount of a missing platform: %v\n%s", err, out)
				}
				e.assertClean()
				return
			}
			e.mount(host+"/multi:1", tt.flags...)
			if b, err := os.ReadFile(filepath.Join(e.target, "arch")); err != nil || string(b) != tt.want {
				t.Errorf("arch = %q, %v; want %q", b, err, tt.want)
			}
			e.umount()
			e.assertClean()
		})
	}
}

// TestPlainLayerTraversal mounts plain layers that try to write outside
// themselves: each attempt is confined to the layer or refuses the mount,
// and nothing appears outside.
func TestPlainLayerTraversal(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	outside := t.TempDir()
	tag := fmt.Sprintf("sgz-escape-%d", os.Getpid())
	tests := []struct {
		name    string
		entries []lt.Entry
		inside  []string // paths the mount shows
		refused bool
	}{
		{"dot-dot", []lt.Entry{lt.FileString("../../../../../../"+outside+"/"+tag, "x")}, []string{strings.TrimPrefix(outside, "/") + "/" + tag}, false},
		{"absolute", []lt.Entry{lt.FileString(outside+"/"+tag, "x")}, []string{strings.TrimPrefix(outside, "/") + "/" + tag}, false},
		{"symlink to / then through it", []lt.Entry{
			lt.Symlink("esc", "/"), lt.FileString("esc/"+tag, "x"),
		}, []string{tag, "esc"}, false},
		{"symlink up then through it", []lt.Entry{
			lt.Symlink("up", "../../../../../../.."), lt.FileString("up/"+tag, "x"),
		}, []string{tag, "up"}, false},
		{"symlink to a directory outside", []lt.Entry{
			lt.Symlink("out", outside), lt.FileString("out/"+tag, "x"),
		}, nil, true},
		{"hard link to a file outside", []lt.Entry{lt.Hardlink("h", "/etc/passwd")}, nil, true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, err := lt.BuildImageAs(0, []lt.Format{lt.FormatGzip}, tt.entries)
			if err != nil {
				t.Fatal(err)
			}
			ref := fmt.Sprintf("%s/escape:%d", host, i)
			lt.Push(t, img, ref)
			e := newEnv(t)
			if tt.refused {
				out, err := e.cmd("--daemon", ref, e.target).CombinedOutput()
				if err == nil {
					t.Errorf("mount succeeded")
					e.umount()
				} else if !strings.Contains(string(out), "layer 0") {
					t.Errorf("error does not name the layer: %s", out)
				}
				if n := len(e.storedLayers()); n != 0 {
					t.Errorf("refused layer stored: %d", n)
				}
			} else {
				e.mount(ref)
				for _, p := range tt.inside {
					if _, err := os.Lstat(filepath.Join(e.target, p)); err != nil {
						t.Errorf("%s: %v", p, err)
					}
				}
				e.umount()
			}
			e.assertClean()
			for _, p := range []string{filepath.Join(outside, tag), "/" + tag, filepath.Join(e.cache, "..", tag), filepath.Join(filepath.Dir(e.target), tag)} {
				if _, err := os.Lstat(p); err == nil {
					t.Errorf("written outside the layer: %s", p)
					os.Remove(p)
				}
			}
		})
	}
}

// TestPlainLayerTampered serves layers whose stored bytes do not match
// their digest: a plain layer is refused and nothing is kept; a zstd:chunked
// layer whose TOC was altered cannot be served lazily, falls back to
// unpacking, and is refused there too.
func TestPlainLayerTampered(t *testing.T) {
	needFUSE(t)
	reg := lt.DistributionRegistry(t)
	tarBytes := lt.Tar(lt.FileString("f", "original\n"))
	tests := []struct {
		name  string
		build func([]byte) (*lt.Blob, error)
		// tamper changes the stored blob.
		tamper func(b *lt.Blob, data []byte)
		want   []string // in the error
	}{
		{"uncompressed", lt.Uncompressed, func(_ *lt.Blob, data []byte) {
			copy(data[bytes.Index(data, []byte("original")):], "modified")
		}, []string{"does not match its digest"}},
		{"zstd:chunked TOC", func(tb []byte) (*lt.Blob, error) { return lt.ZstdChunked(tb) }, func(b *lt.Blob, data []byte) {
			var off, length int64
			fmt.Sscanf(b.Extra[lt.ZstdChunkedPositionAnnotation], "%d:%d:", &off, &length)
			data[off+length/2] ^= 1
		}, []string{"does not match its digest"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := tt.build(tarBytes)
			if err != nil {
				t.Fatal(err)
			}
			img, err := lt.Image(b)
			if err != nil {
				t.Fatal(err)
			}
			ref := fmt.Sprintf("%s/tampered:%d", reg.Addr, i)
			lt.Push(t, img, ref)
			path := reg.BlobPath(b.Digest.String())
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			tt.tamper(b, data)
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			e := newEnv(t)
			out, err := e.cmd("--daemon", ref, e.target).CombinedOutput()
			if err == nil {
				e.umount()
				t.Fatalf("tampered layer mounted")
			}
			for _, w := range append(tt.want, b.Digest.String()) {
				if !strings.Contains(string(out), w) {
					t.Errorf("error output does not mention %q: %s", w, out)
				}
			}
			if n := len(e.storedLayers()); n != 0 {
				t.Errorf("tampered layer stored")
			}
			e.assertClean()
		})
	}
}

// TestUnsupportedLayers: layers stargz-mount cannot mount give one clear
// line naming the layer and what is unsupported.
func TestUnsupportedLayers(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	tests := []struct {
		mediaType types.MediaType
		want      string
	}{
		{"application/vnd.oci.image.layer.v1.tar+gzip+encrypted", "encrypted"},
		{"application/vnd.oci.image.layer.v1.tar+zstd+encrypted", "encrypted"},
		{"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "foreign"},
		{"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "non-distributable"},
		{"application/x-unknown", "unknown layer media type"},
	}
	for i, tt := range tests {
		t.Run(string(tt.mediaType), func(t *testing.T) {
			ok, err := lt.Gzip(lt.Tar(lt.FileString("ok", "ok")))
			if err != nil {
				t.Fatal(err)
			}
			bad, err := lt.Gzip(lt.Tar(lt.FileString(fmt.Sprint(i), "x")))
			if err != nil {
				t.Fatal(err)
			}
			bad.MediaType = tt.mediaType
			img, err := lt.Image(ok, bad)
			if err != nil {
				t.Fatal(err)
			}
			ref := fmt.Sprintf("%s/unsupported:%d", host, i)
			lt.Push(t, img, ref)
			e := newEnv(t)
			var stderr bytes.Buffer
			cmd := e.cmd("--daemon", ref, e.target)
			cmd.Stderr = &stderr
			if err := cmd.Run(); err == nil {
				e.umount()
				t.Fatal("mounted")
			}
			msg := strings.TrimSpace(stderr.String())
			for _, w := range []string{"layer 1", bad.Digest.String(), string(tt.mediaType), tt.want} {
				if !strings.Contains(msg, w) || strings.Contains(msg, "\n") {
					t.Errorf("error %q: want one line mentioning %q", msg, w)
				}
			}
			e.assertClean()
		})
	}
}

// TestBareEStargz: a gzip eStargz layer without the TOC digest annotation
// is unpacked (its blob digest verifies it), and each mount says so in one
// warning that tells how to mount it lazily; with --insecure-skip-verify it
// is served lazily, unverified, without the warning.
func TestBareEStargz(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	b, err := lt.Estargz(lt.Tar(lt.FileString("f", "x")))
	if err != nil {
		t.Fatal(err)
	}
	b.TOCDigest = ""
	bare, err := lt.Image(b)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, bare, host+"/bare:1")
	for _, tt := range []struct {
		flags          []string
		fuse, unpacked int
	}{{nil, 0, 1}, {[]string{"--insecure-skip-verify"}, 1, 0}} {
		t.Run(fmt.Sprint(tt.flags), func(t *testing.T) {
			e := newEnv(t)
			e.mount(host+"/bare:1", tt.flags...)
			if b, err := os.ReadFile(filepath.Join(e.target, "f")); err != nil || string(b) != "x" {
				t.Errorf("f = %q, %v", b, err)
			}
			if f, u := e.fuseMounts(), len(e.storedLayers()); f != tt.fuse || u != tt.unpacked {
				t.Errorf("%d FUSE layers and %d unpacked, want %d and %d", f, u, tt.fuse, tt.unpacked)
			}
			e.umount()
			if tt.unpacked > 0 {
				// Again, from the unpacked layer the first mount left.
				e.mount(host+"/bare:1", tt.flags...)
				e.umount()
			}
			e.assertClean()
			log, _ := os.ReadFile(filepath.Join(e.cache, "stargz-mount.log"))
			var warnings []string
			for _, line := range strings.Split(string(log), "\n") {
				if strings.Contains(line, "TOC digest annotation") {
					warnings = append(warnings, line)
				}
			}
			if tt.unpacked == 0 {
				if len(warnings) != 0 {
					t.Errorf("lazily mounted, yet warned: %q", warnings)
				}
				return
			}
			if len(warnings) != 2 {
				t.Fatalf("%d warnings about the missing annotation in two mounts, want one each:\n%s", len(warnings), log)
			}
			for _, w := range warnings {
				for _, want := range []string{"level=WARN", "layer=" + b.Digest.String(), "not mounted lazily", "cannot be verified",
					"containerd.io/snapshot/stargz/toc.digest", "ctr-remote image optimize", "nerdctl image convert --estargz", "--insecure-skip-verify"} {
					if !strings.Contains(w, want) {
						t.Errorf("warning %q does not say %q", w, want)
					}
				}
			}
		})
	}
}

// TestPlainLifecycle: a mount of only unpacked layers (no FUSE server to
// watch) still stops on umount, and umount cleans up after a killed server.
func TestPlainLifecycle(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	img, err := lt.BuildImageAs(0, []lt.Format{lt.FormatUncompressed}, []lt.Entry{lt.FileString("motd", "hello\n")})
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/plainlife:1")
	for _, kill := range []bool{false, true} {
		t.Run(fmt.Sprintf("kill=%v", kill), func(t *testing.T) {
			e := newEnv(t)
			var stderr bytes.Buffer
			cmd := e.cmd(host+"/plainlife:1", e.target)
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			ready := false
			for range 200 {
				if b, err := os.ReadFile(filepath.Join(e.target, "motd")); err == nil && string(b) == "hello\n" {
					ready = true
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if !ready {
				t.Fatalf("not mounted\n%s", &stderr)
			}
			if kill {
				cmd.Process.Kill()
				cmd.Wait()
			}
			e.umount()
			if !kill {
				done := make(chan error, 1)
				go func() { done <- cmd.Wait() }()
				select {
				case err := <-done:
					if err != nil {
						t.Errorf("server: %v\n%s", err, &stderr)
					}
				case <-time.After(20 * time.Second):
					t.Fatalf("server did not exit\n%s", &stderr)
				}
			}
			e.assertClean()
			if n := len(e.storedLayers()); n != 1 {
				t.Errorf("%d unpacked layers kept, want 1", n)
			}
		})
	}
}

// TestPodmanZstdChunked mounts a zstd:chunked image that podman wrote (its
// containers/storage writer, not the estargz library's) lazily and compares
// it with umoci's rootfs of the same layer tar as gzip.
func TestPodmanZstdChunked(t *testing.T) {
	needFUSE(t)
	if _, err := exec.LookPath("podman"); err != nil {
		t.Skip("needs podman (Debian package podman)")
	}
	reg := lt.DistributionRegistry(t)
	dir := t.TempDir()
	// podman wants a short runroot.
	run, err := os.MkdirTemp("/tmp", "pr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	layer := filepath.Join(dir, "layer.tar")
	if err := os.WriteFile(layer, lt.Tar(lt.Corpus()[0]...), 0o644); err != nil {
		t.Fatal(err)
	}
	podman := func(args ...string) {
		t.Helper()
		cmd := exec.Command("podman", append([]string{"--root", filepath.Join(dir, "root"), "--runroot", run, "--storage-driver", "vfs"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("podman %v: %v\n%s", args, err, out)
		}
	}
	podman("import", layer, "localhost/corpus:1")
	zc := reg.Addr + "/podman:zstd-chunked"
	podman("push", "--tls-verify=false", "--compression-format", "zstd:chunked", "localhost/corpus:1", "docker://"+zc)
	// podman 4.3 reuses the zstd blob when asked for gzip, so the reference
	// is the same tar pushed as gzip by layertest (podman keeps an imported
	// layer's tar byte for byte).
	gzImg, err := lt.BuildImageAs(0, []lt.Format{lt.FormatGzip}, lt.Corpus()[0])
	if err != nil {
		t.Fatal(err)
	}
	gz := reg.Addr + "/podman:gzip"
	lt.Push(t, gzImg, gz)
	want := lt.UmociRootfs(t, gz)

	e := newEnv(t)
	e.mount(zc)
	if diffs := lt.CompareTrees(want, e.target, lt.FormatFiles...); len(diffs) > 0 {
		t.Errorf("%d differences between umoci's rootfs and the mount:\n%s", len(diffs), strings.Join(diffs, "\n"))
	}
	if n, u := e.fuseMounts(), len(e.storedLayers()); n != 1 || u != 0 {
		t.Errorf("%d FUSE layers and %d unpacked, want the layer served lazily", n, u)
	}
	e.umount()
	e.assertClean()
}

// TestUnpackedLayersInCache: unpacked layers show in `cache ls`, are held
// while mounted, go with `cache prune`, and count toward --cache-max-disk.
func TestUnpackedLayersInCache(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	wantA, entriesA := files(4, 256<<10)
	wantB, entriesB := files(3, 256<<10)
	imgA, err := lt.BuildImageAs(0, []lt.Format{lt.FormatGzip}, entriesA)
	if err != nil {
		t.Fatal(err)
	}
	imgB, err := lt.BuildImageAs(0, []lt.Format{lt.FormatZstd}, entriesB)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, imgA, host+"/ua:1")
	lt.Push(t, imgB, host+"/ub:1")
	a := newEnv(t)
	b := a.sibling()
	a.mount(host + "/ua:1")
	checkFiles(t, a.target, wantA)
	dA, dB := layerDigests(t, imgA)[0], layerDigests(t, imgB)[0]
	if g := a.cacheLs()[dA]; g.Kind != "unpacked" || !g.InUse || g.Bytes < 1<<20 {
		t.Errorf("live unpacked layer: %+v", g)
	}
	out, err := exec.Command(binary, "cache", "prune", "--all", "--cache-dir", a.cache).CombinedOutput()
	if err != nil || !strings.Contains(string(out), dA) {
		t.Errorf("prune --all does not keep the live layer: %v: %s", err, out)
	}
	checkFiles(t, a.target, wantA)
	a.umount()
	if g := a.cacheLs()[dA]; g.Kind != "unpacked" || g.InUse {
		t.Errorf("idle unpacked layer: %+v", g)
	}

	// A bound that holds one layer: mounting B prunes idle A.
	b.mount(host+"/ub:1", "--cache-max-disk", "1200KiB")
	checkFiles(t, b.target, wantB)
	ls := b.cacheLs()
	if _, ok := ls[dA]; ok {
		t.Errorf("idle layer %s kept past the bound", dA)
	}
	if g := ls[dB]; !g.InUse {
		t.Errorf("live layer: %+v", g)
	}
	b.umount()
	if out, err := exec.Command(binary, "cache", "prune", "--all", "--cache-dir", a.cache).CombinedOutput(); err != nil {
		t.Fatalf("prune --all: %v: %s", err, out)
	}
	if n := len(a.storedLayers()); n != 0 {
		t.Errorf("%d unpacked layers left after prune --all", n)
	}
	a.assertClean()
}

// TestRootlessPlain mounts plain layers as an unprivileged user: they are
// unpacked with file whiteouts, which fuse-overlayfs applies.
func TestRootlessPlain(t *testing.T) {
	needFUSE(t) // root, to create the user
	if _, err := exec.LookPath("fuse-overlayfs"); err != nil {
		t.Skip("needs fuse-overlayfs (Debian package fuse-overlayfs)")
	}
	host := lt.InProcessRegistry(t)
	img, err := lt.BuildImageAs(64<<10, []lt.Format{lt.FormatGzip, lt.FormatZstd, lt.FormatEStargz},
		[]lt.Entry{
			lt.Dir("etc"), lt.FileString("etc/motd", "hello plain\n"),
			lt.FileString("gone", "deleted above"),
			lt.Dir("opq"), lt.FileString("opq/old", "hidden above"),
			lt.Dir("dev"), lt.Char("dev/null", 1, 3),
		},
		[]lt.Entry{
			lt.Whiteout("gone"),
			lt.Dir("opq"), lt.Opaque("opq"), lt.FileString("opq/new", "new"),
		},
		[]lt.Entry{lt.Dir("etc"), lt.FileString("etc/top", "lazy top\n")})
	if err != nil {
		t.Fatal(err)
	}
	ref := host + "/rootless-plain:1"
	lt.Push(t, img, ref)
	u := newUnprivileged(t)
	work, err := os.MkdirTemp("/tmp", "sgz-rootless-plain")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	os.Chmod(work, 0o755)
	exe := filepath.Join(work, "stargz-mount")
	copyFile(t, binary, exe, 0o755)
	target := filepath.Join(work, "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chown(target, int(u.uid), int(u.gid))
	cache := filepath.Join(work, "cache")
	os.Mkdir(cache, 0o755)
	os.Chown(cache, int(u.uid), int(u.gid))
	t.Cleanup(func() {
		if mounted(target) {
			exec.Command(binary, "umount", target).Run()
		}
		if mounted(target) {
			unix.Unmount(target, unix.MNT_DETACH)
		}
	})
	openDevFuse(t)
	u.run(exe, "--cache-dir", cache, "--daemon", ref, target)
	if fs := fsType(target); fs != "fuse.fuse-overlayfs" {
		t.Errorf("mount type %q, want fuse.fuse-overlayfs", fs)
	}
	if got := u.run("ls", "-A", target); got != "dev\netc\nopq\n" {
		t.Errorf("ls as the user: %q", got)
	}
	if got := u.run("ls", "-A", target+"/opq"); got != "new\n" {
		t.Errorf("opaque dir shows %q, want only the top layer's", got)
	}
	if got := u.run("cat", target+"/etc/motd", target+"/etc/top"); got != "hello plain\nlazy top\n" {
		t.Errorf("cat as the user: %q", got)
	}
	u.run(exe, "umount", target)
	if mounted(target) {
		t.Errorf("%s still mounted after umount", target)
	}
	if left := leftMounts(cache); len(left) > 0 {
		t.Errorf("mounts left: %q", left)
	}
}

// TestOfflineRemountFormats: once read, an image of a plain layer and a
// zstd:chunked layer mounts again by digest with the registry gone.
func TestOfflineRemountFormats(t *testing.T) {
	needFUSE(t)
	host, stop := stoppableRegistry(t)
	want, entries := files(8, 100<<10)
	img, err := lt.BuildImageAs(64<<10, []lt.Format{lt.FormatGzip, lt.FormatZstdChunked},
		[]lt.Entry{lt.Dir("etc"), lt.FileString("etc/motd", "hi\n")}, entries)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/offfmt:1")
	want["etc/motd"] = []byte("hi\n")
	e := newEnv(t)
	e.mount(host + "/offfmt:1")
	checkFiles(t, e.target, want)
	e.umount()
	stop()
	e.mount(host + "/offfmt@" + imageDigest(t, img))
	checkFiles(t, e.target, want)
	if n, u := e.fuseMounts(), len(e.storedLayers()); n != 1 || u != 1 {
		t.Errorf("%d FUSE layers and %d unpacked, want 1 and 1", n, u)
	}
	e.umount()
	e.assertClean()
}

// TestRepeatedPlainLayer mounts an image that lists one plain layer twice
// (images repeat the empty layer often): overlayfs takes a directory once.
func TestRepeatedPlainLayer(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	a, err := lt.Gzip(lt.Tar(lt.FileString("f", "a"), lt.FileString("only-a", "a")))
	if err != nil {
		t.Fatal(err)
	}
	b, err := lt.Gzip(lt.Tar(lt.FileString("f", "b"), lt.Whiteout("only-a")))
	if err != nil {
		t.Fatal(err)
	}
	img, err := lt.Image(a, b, a)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/repeat:1")
	e := newEnv(t)
	e.mount(host + "/repeat:1")
	for name, want := range map[string]string{"f": "a", "only-a": "a"} {
		if got, err := os.ReadFile(filepath.Join(e.target, name)); err != nil || string(got) != want {
			t.Errorf("%s = %q, %v; want %q", name, got, err, want)
		}
	}
	e.umount()
	e.assertClean()
}

// TestAnnotatedPlainGzip: a plain gzip layer that carries a TOC digest
// annotation anyway (no eStargz footer) is unpacked, not refused.
func TestAnnotatedPlainGzip(t *testing.T) {
	needFUSE(t)
	host := lt.InProcessRegistry(t)
	b, err := lt.Gzip(lt.Tar(lt.FileString("f", "plain\n")))
	if err != nil {
		t.Fatal(err)
	}
	b.TOCDigest = "sha256:" + strings.Repeat("a", 64)
	img, err := lt.Image(b)
	if err != nil {
		t.Fatal(err)
	}
	lt.Push(t, img, host+"/annotated:1")
	e := newEnv(t)
	e.mount(host + "/annotated:1")
	if got, err := os.ReadFile(filepath.Join(e.target, "f")); err != nil || string(got) != "plain\n" {
		t.Errorf("f = %q, %v", got, err)
	}
	if n := len(e.storedLayers()); n != 1 {
		t.Errorf("%d unpacked layers, want 1", n)
	}
	e.umount()
	e.assertClean()
}
