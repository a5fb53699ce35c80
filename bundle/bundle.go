// Package bundle makes the config.json of an OCI runtime bundle from an
// image config, the way `umoci unpack` does: entrypoint and cmd become the
// process arguments, with the image's env, working dir and user (names
// looked up in the rootfs's /etc/passwd and /etc/group), on top of the
// defaults of `runc spec` (mounts, namespaces, capabilities, masked paths).
// The process is not interactive (terminal false), so runc and crun run it
// from a script.
package bundle

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// RootfsDir is the bundle-relative path of the root file system.
const RootfsDir = "rootfs"

// ConfigFile is the name of the runtime config in a bundle.
const ConfigFile = "config.json"

// Annotation keys umoci writes from the image config.
const (
	AnnotationOS           = "org.opencontainers.image.os"
	AnnotationArchitecture = "org.opencontainers.image.architecture"
	AnnotationAuthor       = "org.opencontainers.image.author"
	AnnotationCreated      = "org.opencontainers.image.created"
	AnnotationStopSignal   = "org.opencontainers.image.stopSignal"
	AnnotationExposedPorts = "org.opencontainers.image.exposedPorts"
)

// SpecVersion is the ociVersion written: runtime-spec 1.0.2, the fields
// used here all exist in it, and crun (1.8, Debian bookworm) refuses any
// version that is not 1.0.x.
const SpecVersion = "1.0.2"

// Option adjusts Spec.
type Option func(*options)

type options struct {
	readOnly bool
	rootless bool
	hostUID  uint32
	hostGID  uint32
}

// ReadOnly marks the root file system read-only (root.readonly), as it must
// be for a read-only mount: the runtime then never writes to it. Default
// false.
func ReadOnly(ro bool) Option { return func(o *options) { o.readOnly = ro } }

// Rootless makes the spec runnable by an unprivileged user, as `runc spec
// --rootless` does: a user namespace mapping uid and gid to root, no network
// namespace, /sys bind-mounted instead of a new sysfs, no cgroup mount.
// The process runs as that root, whatever the image's user. Default off.
func Rootless(uid, gid uint32) Option {
	return func(o *options) { o.rootless, o.hostUID, o.hostGID = true, uid, gid }
}

// Spec returns the runtime spec for an image with config cfg whose root file
// system is (or will be) at rootfs; rootfs is read for /etc/passwd and
// /etc/group when the image's user is a name, and may be "" to allow only
// numeric users.
func Spec(cfg *v1.ConfigFile, rootfs string, opts ...Option) (*specs.Spec, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if cfg == nil {
		return nil, errors.New("no image config")
	}
	if cfg.OS != "" && cfg.OS != "linux" {
		return nil, fmt.Errorf("image OS is %q: only linux images make a bundle", cfg.OS)
	}
	s := defaultSpec()
	s.Root.Readonly = o.readOnly
	c := cfg.Config
	s.Process.Args = append(append([]string{}, c.Entrypoint...), c.Cmd...)
	if len(s.Process.Args) == 0 {
		return nil, errors.New("the image config has neither entrypoint nor cmd: nothing to run")
	}
	if c.WorkingDir != "" {
		s.Process.Cwd = c.WorkingDir
	}
	env, err := envList(c.Env)
	if err != nil {
		return nil, err
	}
	userSpec := c.User
	if o.rootless {
		// Only the caller is mapped (to root): the image's user cannot be.
		userSpec = ""
	}
	u, err := lookupUser(userSpec, rootfs)
	if err != nil {
		return nil, err
	}
	s.Process.User = specs.User{UID: u.uid, GID: u.gid, AdditionalGids: u.sgids}
	if u.home != "" && !hasEnv(env, "HOME") {
		env = append(env, "HOME="+u.home)
	}
	s.Process.Env = env

	s.Annotations = map[string]string{}
	for k, v := range c.Labels {
		s.Annotations[k] = v
	}
	s.Annotations[AnnotationOS] = cfg.OS
	s.Annotations[AnnotationArchitecture] = cfg.Architecture
	s.Annotations[AnnotationAuthor] = cfg.Author
	s.Annotations[AnnotationCreated] = cfg.Created.UTC().Format("2006-01-02T15:04:05Z07:00")
	s.Annotations[AnnotationStopSignal] = c.StopSignal
	if len(c.ExposedPorts) > 0 {
		ports := make([]string, 0, len(c.ExposedPorts))
		for p := range c.ExposedPorts {
			ports = append(ports, p)
		}
		sort.Strings(ports)
		s.Annotations[AnnotationExposedPorts] = strings.Join(ports, ",")
	}
	vols := make([]string, 0, len(c.Volumes))
	for v := range c.Volumes {
		vols = append(vols, v)
	}
	sort.Strings(vols)
	for _, v := range vols {
		// As umoci: a volume is an empty tmpfs, since the bundle has no
		// volume store.
		s.Mounts = append(s.Mounts, specs.Mount{Destination: v, Type: "tmpfs", Source: "none",
			Options: []string{"rw", "nosuid", "noexec"}})
	}
	if o.rootless {
		toRootless(s, o.hostUID, o.hostGID)
	}
	return s, nil
}

// Write writes s as dir/config.json (temp file and rename).
func Write(dir string, s *specs.Spec) error {
	b, err := json.MarshalIndent(s, "", "\t")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, "."+ConfigFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write bundle config: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, ConfigFile)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write bundle config: %w", err)
	}
	return nil
}

func envList(env []string) ([]string, error) {
	out := make([]string, 0, len(env))
	for _, e := range env {
		name, _, ok := strings.Cut(e, "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("image env %q is not NAME=VALUE", e)
		}
		out = append(out, e)
	}
	return out, nil
}

func hasEnv(env []string, name string) bool {
	for _, e := range env {
		if strings.HasPrefix(e, name+"=") {
			return true
		}
	}
	return false
}

// defaultSpec is `runc spec` with umoci's changes: the capability set of
// runtime-tools' generator (Docker's defaults), no terminal, no seccomp.
func defaultSpec() *specs.Spec {
	caps := []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
		"CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
	}
	return &specs.Spec{
		Version: SpecVersion,
		Process: &specs.Process{
			Terminal: false,
			Cwd:      "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding:  caps,
				Effective: caps,
				Permitted: caps,
			},
			Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
		},
		Root:     &specs.Root{Path: RootfsDir},
		Hostname: "stargz-mount",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		},
		Linux: &specs.Linux{
			Resources: &specs.LinuxResources{
				Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.NetworkNamespace},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
				"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
			},
			ReadonlyPaths: []string{
				"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
			},
		},
	}
}

// toRootless is runc's specconv.ToRootless: a user namespace that maps the
// calling user to root, no network namespace (it would need root outside),
// /sys bind-mounted, no cgroup mount and no device cgroup rules.
func toRootless(s *specs.Spec, uid, gid uint32) {
	var ns []specs.LinuxNamespace
	for _, n := range s.Linux.Namespaces {
		if n.Type != specs.NetworkNamespace && n.Type != specs.UserNamespace {
			ns = append(ns, n)
		}
	}
	s.Linux.Namespaces = append(ns, specs.LinuxNamespace{Type: specs.UserNamespace})
	s.Linux.UIDMappings = []specs.LinuxIDMapping{{HostID: uid, ContainerID: 0, Size: 1}}
	s.Linux.GIDMappings = []specs.LinuxIDMapping{{HostID: gid, ContainerID: 0, Size: 1}}
	var mounts []specs.Mount
	for _, m := range s.Mounts {
		switch m.Destination {
		case "/sys":
			m = specs.Mount{Destination: "/sys", Type: "none", Source: "/sys", Options: []string{"rbind", "nosuid", "noexec", "nodev", "ro"}}
		case "/sys/fs/cgroup":
			continue
		case "/dev/pts":
			var o []string
			for _, opt := range m.Options {
				if opt != "gid=5" {
					o = append(o, opt)
				}
			}
			m.Options = o
		}
		mounts = append(mounts, m)
	}
	s.Mounts = mounts
	s.Linux.Resources = nil
}
