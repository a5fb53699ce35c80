package mount

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:             "/plain",
		`/with\040space`:     "/with space",
		`/tab\011and\134bs`:  "/tab\tand\\bs",
		`/trailing\`:         `/trailing\`,
		`/not\9octal\040end`: `/not\9octal end`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCheckTarget(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	full := filepath.Join(dir, "full")
	file := filepath.Join(dir, "file")
	os.Mkdir(empty, 0o755)
	os.Mkdir(full, 0o755)
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	os.WriteFile(file, nil, 0o644)
	tests := []struct {
		target, err string
	}{
		{empty, ""},
		{filepath.Join(dir, "missing"), "does not exist"},
		{full, "not empty"},
		{file, "not a directory"},
		{"/proc", "not empty"},
	}
	for _, tt := range tests {
		got, err := CheckTarget(tt.target)
		switch {
		case tt.err == "" && (err != nil || got != tt.target):
			t.Errorf("CheckTarget(%s) = %q, %v", tt.target, got, err)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("CheckTarget(%s) error = %v, want %q", tt.target, err, tt.err)
		}
	}
}

func TestUnmountNotOurs(t *testing.T) {
	if err := Unmount(t.TempDir(), nil); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Errorf("Unmount of a plain dir = %v, want 'not mounted'", err)
	}
	if err := Unmount("/proc", nil); err == nil || !strings.Contains(err.Error(), "not one of stargz-mount's") {
		t.Errorf("Unmount(/proc) = %v, want refusal", err)
	}
}
