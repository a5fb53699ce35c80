package bundle

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const passwd = `root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken line
app:x:1000:1000:App:/home/app:/bin/sh
`

const group = `root:x:0:
daemon:x:1:
audio:x:29:app
video:x:44:app,other
app:x:1000:
`

func rootfs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "etc"), 0o755)
	os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte(passwd), 0o644)
	os.WriteFile(filepath.Join(dir, "etc/group"), []byte(group), 0o644)
	return dir
}

func TestLookupUser(t *testing.T) {
	root := rootfs(t)
	tests := []struct {
		spec    string
		rootfs  string
		want    execUser
		wantErr bool
	}{
		{"", root, execUser{0, 0, nil, "/root"}, false},
		{"", "", execUser{0, 0, nil, "/"}, false},
		{"app", root, execUser{1000, 1000, []uint32{29, 44}, "/home/app"}, false},
		{"1000", root, execUser{1000, 1000, []uint32{29, 44}, "/home/app"}, false},
		{"app:audio", root, execUser{1000, 29, nil, "/home/app"}, false},
		{"app:44", root, execUser{1000, 44, nil, "/home/app"}, false},
		{"1000:5000", root, execUser{1000, 5000, nil, "/home/app"}, false},
		{"4242", root, execUser{4242, 0, nil, "/"}, false},
		{"4242:4343", "", execUser{4242, 4343, nil, "/"}, false},
		{"daemon", root, execUser{1, 1, nil, "/usr/sbin"}, false},
		{"nobody", root, execUser{}, true},
		{"app:nogroup", root, execUser{}, true},
		{"nobody", "", execUser{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.spec+"@"+filepath.Base(tt.rootfs), func(t *testing.T) {
			got, err := lookupUser(tt.spec, tt.rootfs)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("got %+v, want an error", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestLookupUserStaysInRootfs(t *testing.T) {
	// An /etc/passwd that points out of the rootfs must not be read.
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(outside, []byte("evil:x:0:0::/evil:/bin/sh\n"), 0o644)
	os.Mkdir(filepath.Join(dir, "etc"), 0o755)
	os.Symlink("../../../../../../../../.."+outside, filepath.Join(dir, "etc/passwd"))
	if u, err := lookupUser("evil", dir); err == nil {
		t.Errorf("looked up %+v through a symlink out of the rootfs", u)
	}
}

func TestSpec(t *testing.T) {
	root := rootfs(t)
	cfg := &v1.ConfigFile{
		OS:           "linux",
		Architecture: "amd64",
		Author:       "someone",
		Config: v1.Config{
			Entrypoint:   []string{"/bin/app", "--serve"},
			Cmd:          []string{"--port", "80"},
			Env:          []string{"PATH=/bin", "LANG=C.UTF-8"},
			WorkingDir:   "/srv",
			User:         "app",
			Labels:       map[string]string{"org.example": "yes"},
			ExposedPorts: map[string]struct{}{"80/tcp": {}, "443/tcp": {}},
			Volumes:      map[string]struct{}{"/data": {}},
			StopSignal:   "SIGQUIT",
		},
	}
	s, err := Spec(cfg, root, ReadOnly(true))
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"args", s.Process.Args, []string{"/bin/app", "--serve", "--port", "80"}},
		{"env", s.Process.Env, []string{"PATH=/bin", "LANG=C.UTF-8", "HOME=/home/app"}},
		{"cwd", s.Process.Cwd, "/srv"},
		{"user", s.Process.User, specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{29, 44}}},
		{"terminal", s.Process.Terminal, false},
		{"root", *s.Root, specs.Root{Path: "rootfs", Readonly: true}},
		{"label", s.Annotations["org.example"], "yes"},
		{"ports", s.Annotations[AnnotationExposedPorts], "443/tcp,80/tcp"},
		{"stop signal", s.Annotations[AnnotationStopSignal], "SIGQUIT"},
		{"author", s.Annotations[AnnotationAuthor], "someone"},
		{"volume", s.Mounts[len(s.Mounts)-1].Destination, "/data"},
		{"noNewPrivileges", s.Process.NoNewPrivileges, false},
		{"user namespace", slices.ContainsFunc(s.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.UserNamespace }), false},
		{"network namespace", slices.ContainsFunc(s.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.NetworkNamespace }), true},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %#v, want %#v", c.name, c.got, c.want)
		}
	}

	t.Run("errors", func(t *testing.T) {
		bad := []*v1.ConfigFile{
			nil,
			{OS: "windows", Config: v1.Config{Cmd: []string{"x"}}},
			{OS: "linux"},
			{OS: "linux", Config: v1.Config{Cmd: []string{"x"}, Env: []string{"NOEQUALS"}}},
			{OS: "linux", Config: v1.Config{Cmd: []string{"x"}, User: "ghost"}},
		}
		for i, c := range bad {
			if _, err := Spec(c, root); err == nil {
				t.Errorf("config %d: no error", i)
			}
		}
	})

	t.Run("rootless", func(t *testing.T) {
		s, err := Spec(cfg, root, Rootless(1234, 2345))
		if err != nil {
			t.Fatal(err)
		}
		if s.Process.User.UID != 0 || s.Process.User.GID != 0 || s.Process.Env[len(s.Process.Env)-1] != "HOME=/root" {
			t.Errorf("rootless process user %+v env %q, want root", s.Process.User, s.Process.Env)
		}
		if s.Linux.UIDMappings[0].HostID != 1234 || s.Linux.GIDMappings[0].HostID != 2345 {
			t.Errorf("mappings %+v %+v", s.Linux.UIDMappings, s.Linux.GIDMappings)
		}
		for _, n := range s.Linux.Namespaces {
			if n.Type == specs.NetworkNamespace {
				t.Errorf("rootless spec has a network namespace")
			}
		}
		for _, m := range s.Mounts {
			if m.Type == "sysfs" || m.Type == "cgroup" || slices.Contains(m.Options, "gid=5") {
				t.Errorf("rootless spec has mount %+v", m)
			}
		}
	})

	t.Run("write", func(t *testing.T) {
		dir := t.TempDir()
		if err := Write(dir, s); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, ConfigFile))
		if err != nil {
			t.Fatal(err)
		}
		var back specs.Spec
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back.Process.Args, s.Process.Args) || back.Version != SpecVersion {
			t.Errorf("round trip: %+v", back.Process)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 1 {
			t.Errorf("bundle dir has %d entries, want only config.json", len(ents))
		}
	})
}
