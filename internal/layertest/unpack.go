package layertest

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// FormatFiles are the root-level eStargz metadata entries that the
// decompressed layer tar contains but a lazy mount hides. Pass them as the
// ignore list of CompareTrees when comparing against UmociRootfs.
//
// Verified with umoci 0.4.7: it unpacks an eStargz layer as an ordinary tar,
// so the rootfs keeps /stargz.index.json and /.no.prefetch.landmark (or
// /.prefetch.landmark for layers built with prioritized files). Each layer
// overwrites them, so the TOC left behind is the top layer's. estargz.Build
// writes them with mode 0000, uid/gid 0 and a zero mtime, which come out as
// 0000 files dated 1970-01-01. umoci also gives the rootfs directory itself
// mode 0755 and mtime 1970-01-01 (no layer has a "./" entry), which is why
// CompareTrees skips the roots.
var FormatFiles = []string{"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}

// UmociRootfs copies ref from a plain-HTTP registry into an OCI layout with
// skopeo, unpacks it with umoci and returns the rootfs directory: the
// reference result a lazy mount should match. It skips the test unless
// running as root with skopeo and umoci installed.
func UmociRootfs(t testing.TB, ref string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("UmociRootfs needs root (umoci unpack without --rootless)")
	}
	for _, tool := range []string{"skopeo", "umoci"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("UmociRootfs needs %s: %v", tool, err)
		}
	}
	dir := t.TempDir()
	layout, bundle := filepath.Join(dir, "oci"), filepath.Join(dir, "bundle")
	run(t, "skopeo", "copy", "--insecure-policy", "--src-tls-verify=false",
		"docker://"+ref, "oci:"+layout+":latest")
	run(t, "umoci", "unpack", "--image", layout+":latest", bundle)
	return filepath.Join(bundle, "rootfs")
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}
