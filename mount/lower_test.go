package mount

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMountDirLowers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount overlayfs (CI runs this as root)")
	}
	base := t.TempDir()
	bottom, top := filepath.Join(base, "bottom"), filepath.Join(base, "top")
	for _, d := range []string{bottom, top} {
		os.Mkdir(d, 0o755)
	}
	os.WriteFile(filepath.Join(bottom, "kept"), []byte("bottom"), 0o644)
	os.WriteFile(filepath.Join(bottom, "gone"), []byte("bottom"), 0o644)
	os.WriteFile(filepath.Join(bottom, "over"), []byte("bottom"), 0o644)
	os.WriteFile(filepath.Join(top, "over"), []byte("top"), 0o644)
	if err := unix.Mknod(filepath.Join(top, "gone"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		lowers []Lower
		want   map[string]string // path → content, "" for absent
		unmnt  func(m *Mounted) error
	}{
		{"two directories", []Lower{{Dir: bottom}, {Dir: top}},
			map[string]string{"kept": "bottom", "over": "top", "gone": ""},
			func(m *Mounted) error { return m.Close() }},
		{"one directory then umount", []Lower{{Dir: bottom}},
			map[string]string{"kept": "bottom", "over": "bottom", "gone": "bottom"},
			func(m *Mounted) error { return Unmount(m.Target, nil) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := filepath.Join(t.TempDir(), "mnt")
			os.Mkdir(target, 0o755)
			m, err := MountLowers(context.Background(), tt.lowers, target, Options{StateDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { unix.Unmount(target, unix.MNT_DETACH) })
			for p, want := range tt.want {
				b, err := os.ReadFile(filepath.Join(target, p))
				if want == "" && err == nil || want != "" && string(b) != want {
					t.Errorf("%s = %q, %v; want %q", p, b, err, want)
				}
			}
			if err := tt.unmnt(m); err != nil {
				t.Fatal(err)
			}
			if ok, _ := isMountPoint(target); ok {
				t.Errorf("%s still mounted", target)
			}
			if _, err := os.Stat(m.Dir()); err == nil {
				t.Errorf("state dir %s left", m.Dir())
			}
			if _, err := os.Stat(filepath.Join(bottom, "kept")); err != nil {
				t.Errorf("unmount touched the lower directory: %v", err)
			}
		})
	}
	if _, err := MountLowers(context.Background(), []Lower{{}}, t.TempDir(), Options{StateDir: t.TempDir()}); err == nil {
		t.Error("a Lower with neither layer nor directory was accepted")
	}
}
