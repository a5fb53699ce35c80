// Command stargz-mount mounts a container image from an OCI registry as a
// root filesystem without pulling it: each eStargz or zstd:chunked layer is
// served lazily through FUSE, plain layers are unpacked into a shared cache,
// and the layers are stacked with overlayfs.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"

	"github.com/stargz-mount/stargz-mount/bundle"
	"github.com/stargz-mount/stargz-mount/fetcher"
	"github.com/stargz-mount/stargz-mount/lru"
	"github.com/stargz-mount/stargz-mount/mount"
	"github.com/stargz-mount/stargz-mount/reader"
	"github.com/stargz-mount/stargz-mount/stats"
	"github.com/stargz-mount/stargz-mount/unpack"
)

// readyFDEnv names the file descriptor a --daemon child reports readiness on.
const readyFDEnv = "STARGZ_MOUNT_READY_FD"

func main() {
	if err := newApp().Run(os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "stargz-mount: %v\n", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:      "stargz-mount",
		Usage:     "mount a container image's root filesystem without pulling it",
		UsageText: "stargz-mount [options] REF MOUNTPOINT\n   stargz-mount bundle [options] REF DIR\n   stargz-mount umount MOUNTPOINT\n   stargz-mount stats [--json] MOUNTPOINT\n   stargz-mount inspect [--json] REF\n   stargz-mount cache ls [--json] | du | prune [--all] [--max SIZE]",
		Description: `Resolves REF in its OCI registry and mounts the image's root filesystem at
MOUNTPOINT, an existing empty directory. Only each layer's table of contents is
fetched up front; file data is fetched, verified and cached when it is read.
Each eStargz or zstd:chunked layer is served read-only through FUSE; plain
gzip, zstd and uncompressed layers are fetched once, checked against their
digest and unpacked into the cache dir; the layers are stacked with
overlayfs. stargz-mount stays in the foreground (--daemon: in the
background) until SIGINT or SIGTERM or 'stargz-mount umount MOUNTPOINT',
then removes every mount it made; a layer mount that another image mounted
since shares (--share-layers) is served on until that image is unmounted.

Example:
   mkdir /mnt/app && stargz-mount --daemon registry.example.com/app:1.0 /mnt/app
   ls /mnt/app && stargz-mount umount /mnt/app

Limits on hostile layers: a TOC of at most ` + sizeString(reader.MaxTOCBytes) + ` compressed and ` +
			sizeString(reader.MaxTOCJSONBytes) + ` decompressed, ` +
			strconv.Itoa(reader.MaxEntries) + ` entries,
paths at most ` + strconv.Itoa(reader.MaxDepth) + ` directories deep, chunks at most ` + sizeString(reader.MaxChunkSize) + `.`,
		HideHelpCommand: true,
		Flags:           append(append(mountFlags(), fastFlags()...), commonFlags()...),
		Action:          mountAction,
		Commands: []*cli.Command{
			{
				Name:  "bundle",
				Usage: "mount an image as the rootfs of an OCI runtime bundle (DIR/rootfs, DIR/config.json) for runc or crun",
				Description: `Mounts REF at DIR/rootfs (DIR and DIR/rootfs are created if missing) and
writes DIR/config.json from the image config as 'umoci unpack' does:
entrypoint and cmd, env, working dir and user, non-interactive. Then
'runc run -b DIR ID' or 'crun run -b DIR ID' runs the image. Serves like the
plain mount: in the foreground until a signal or 'stargz-mount umount DIR/rootfs',
or in the background with --daemon. As a non-root user the config is rootless
(a user namespace mapping you to root).`,
				ArgsUsage: "REF DIR",
				Flags:     append(append(mountFlags(), fastFlags()...), commonFlags()...),
				Action:    bundleAction,
			},
			{
				Name:      "umount",
				Aliases:   []string{"unmount"},
				Usage:     "unmount an image mounted by stargz-mount, even if its server was killed",
				ArgsUsage: "MOUNTPOINT",
				Flags:     []cli.Flag{logLevelFlag()},
				Action:    umountAction,
			},
			cacheCommand(),
			{
				Name:      "inspect",
				Usage:     "show an image's platform and layers without mounting it",
				ArgsUsage: "REF",
				Flags:     append([]cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON instead of a table"}}, commonFlags()...),
				Action:    inspectAction,
			},
			statsCommand(),
		},
	}
}

func logLevelFlag() cli.Flag {
	return &cli.StringFlag{Name: "log-level", Value: "info", Usage: "log `LEVEL`: debug, info, warn or error (logs go to stderr)"}
}

// commonFlags are the flags of every command that talks to a registry.
func commonFlags() []cli.Flag {
	return []cli.Flag{
		logLevelFlag(),
		&cli.StringFlag{Name: "platform", Usage: "pick `OS/ARCH[/VARIANT]` from a multi-platform image (default: this host's)"},
		&cli.BoolFlag{Name: "plain-http", Usage: "speak plain HTTP to the registry (always so for localhost, 127.0.0.0/8 and ::1)"},
		&cli.BoolFlag{Name: "insecure-skip-tls-verify", Usage: "accept any TLS certificate from the registry"},
		&cli.BoolFlag{Name: "insecure-skip-verify", Usage: "serve gzip layers without a TOC digest annotation lazily, unverified (default: unpack them, checked against their digest)"},
		&cli.StringFlag{Name: "creds", Usage: "log in to the registry as `USER:PASS` (default: podman auth files, then the Docker config)"},
		&cli.StringFlag{Name: "ca-file", Usage: "trust the PEM certificates in `FILE` besides the system roots"},
		&cli.StringSliceFlag{Name: "mirror", Usage: "try `REGISTRY=MIRROR` (host[:port]) first for REGISTRY's images, the origin if it fails; repeatable"},
		&cli.DurationFlag{Name: "fetch-timeout", Value: fetcher.DefaultFetchTimeout, Usage: "give up a blob read after `DURATION`, retries included; the read fails with EIO"},
		&cli.IntFlag{Name: "max-concurrent-fetches", Value: fetcher.DefaultMaxConcurrentFetches, Usage: "at most `N` blob requests in flight to one host"},
	}
}

func mountFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "cache-dir", Value: defaultCacheDir(), Usage: "`DIR` for caches and per-mount state"},
		&cli.StringFlag{Name: "cache-max-memory", Value: "256MiB", Usage: "memory for decompressed file data, in `SIZE` units (64MiB, 1GiB) or bytes"},
		&cli.StringFlag{Name: "cache-max-disk", Value: "10GiB", Usage: "disk for file data, TOCs and manifests in the cache dir, in `SIZE` units; 0 turns the disk cache off"},
		&cli.BoolFlag{Name: "daemon", Usage: "return once the mount is ready and serve it in the background, logging to stargz-mount.log in the cache dir"},
		&cli.BoolFlag{Name: "writable", Usage: "make the rootfs writable; changes live in the state dir and are discarded at unmount"},
		&cli.StringFlag{Name: "upper", Usage: "writable rootfs keeping changes in `DIR` (with --work, same file system)"},
		&cli.StringFlag{Name: "work", Usage: "overlay work `DIR` for --upper"},
		&cli.BoolFlag{Name: "passthrough", Value: true, Usage: "serve files of 1 MiB or more that were read whole from a copy in the disk cache that the kernel reads itself (FUSE passthrough, Linux 6.9+, root only), so warm reads skip the daemon; the layer mounts then count as stacked file systems, so --passthrough=false if you stack another overlay on the rootfs"},
		&cli.BoolFlag{Name: "share-layers", Value: true, Usage: "share each eStargz or zstd:chunked layer's FUSE mount with other mounts using the same --cache-dir (root only): the first mount serves it until the last user is gone; --share-layers=false mounts every layer privately"},
	}
}

func defaultCacheDir() string {
	if os.Geteuid() == 0 {
		return "/var/cache/stargz-mount"
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "stargz-mount")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "stargz-mount")
	}
	return filepath.Join(os.TempDir(), "stargz-mount")
}

func newLogger(c *cli.Context, w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lvl})), nil
}

// args checks for exactly n positional arguments, catching flags placed
// after them (which the flag parser would take as arguments).
func args(c *cli.Context, names ...string) ([]string, error) {
	a := c.Args().Slice()
	for _, s := range a {
		if strings.HasPrefix(s, "-") {
			return nil, fmt.Errorf("flag %s after the arguments: put flags before %s", s, strings.Join(names, " "))
		}
	}
	if len(a) != len(names) {
		return nil, fmt.Errorf("want %s, got %d argument(s); see --help", strings.Join(names, " "), len(a))
	}
	return a, nil
}

func fetchOptions(c *cli.Context, logger *slog.Logger) ([]fetcher.Option, error) {
	opts := []fetcher.Option{
		fetcher.WithPlainHTTP(c.Bool("plain-http")),
		fetcher.WithInsecureSkipTLSVerify(c.Bool("insecure-skip-tls-verify")),
		fetcher.WithLogger(logger),
		fetcher.WithFetchTimeout(c.Duration("fetch-timeout")),
		fetcher.WithMaxConcurrentFetches(c.Int("max-concurrent-fetches")),
	}
	if s := c.String("creds"); s != "" {
		user, pass, err := fetcher.ParseCreds(s)
		if err != nil {
			return nil, fmt.Errorf("--creds: %w", err)
		}
		opts = append(opts, fetcher.WithKeychain(fetcher.Keychain(user, pass)))
	}
	if f := c.String("ca-file"); f != "" {
		opts = append(opts, fetcher.WithCAFile(f))
	}
	for _, m := range c.StringSlice("mirror") {
		reg, mirror, ok := strings.Cut(m, "=")
		if !ok || reg == "" || mirror == "" {
			return nil, fmt.Errorf("--mirror %q: want REGISTRY=MIRROR, e.g. docker.io=mirror.example.com", m)
		}
		opts = append(opts, fetcher.WithMirror(reg, mirror))
	}
	if c.Duration("fetch-timeout") <= 0 {
		return nil, fmt.Errorf("--fetch-timeout %s: want a positive duration such as 30s", c.Duration("fetch-timeout"))
	}
	if c.Int("max-concurrent-fetches") <= 0 {
		return nil, fmt.Errorf("--max-concurrent-fetches %d: want at least 1", c.Int("max-concurrent-fetches"))
	}
	if p := c.String("platform"); p != "" {
		plat, err := fetcher.ParsePlatform(p)
		if err != nil {
			return nil, fmt.Errorf("--platform: %w", err)
		}
		opts = append(opts, fetcher.WithPlatform(plat))
	}
	return opts, nil
}

func mountAction(c *cli.Context) error {
	a, err := args(c, "REF", "MOUNTPOINT")
	if err != nil {
		if c.NArg() == 0 {
			cli.ShowAppHelp(c)
			return cli.Exit("", 2)
		}
		return err
	}
	return run(c, a[0], a[1], nil)
}

// bundleAction mounts REF at DIR/rootfs and writes DIR/config.json.
func bundleAction(c *cli.Context) error {
	a, err := args(c, "REF", "DIR")
	if err != nil {
		return err
	}
	dir := a[1]
	if os.Getenv(readyFDEnv) == "" {
		if err := os.MkdirAll(filepath.Join(dir, bundle.RootfsDir), 0o755); err != nil {
			return fmt.Errorf("bundle directory: %w", err)
		}
	}
	return run(c, a[0], filepath.Join(dir, bundle.RootfsDir), func(img *fetcher.Image, m *mount.Mounted) error {
		opts := []bundle.Option{bundle.ReadOnly(!c.Bool("writable") && c.String("upper") == "")}
		if uid := os.Geteuid(); uid != 0 {
			opts = append(opts, bundle.Rootless(uint32(uid), uint32(os.Getegid())))
		}
		spec, err := bundle.Spec(img.Config, m.Target, opts...)
		if err != nil {
			return fmt.Errorf("bundle config: %w", err)
		}
		return bundle.Write(filepath.Dir(m.Target), spec)
	})
}

// run serves ref at target, in the background with --daemon; mounted, if
// not nil, runs once the mount is up and before it is reported ready.
func run(c *cli.Context, ref, target string, mounted func(*fetcher.Image, *mount.Mounted) error) error {
	if c.Bool("daemon") && os.Getenv(readyFDEnv) == "" {
		return daemonize(target, filepath.Join(c.String("cache-dir"), "stargz-mount.log"), progressWriter(c.Bool("quiet")))
	}
	ready := func(error) {}
	if fd := os.Getenv(readyFDEnv); fd != "" {
		ready = readyReporter(fd)
	}
	err := serve(c, ref, target, ready, mounted)
	if err != nil {
		ready(err)
	}
	return err
}

func serve(c *cli.Context, ref, target string, ready func(error), mounted func(*fetcher.Image, *mount.Mounted) error) error {
	logger, err := newLogger(c, os.Stderr)
	if err != nil {
		return err
	}
	memory, err := parseSize(c.String("cache-max-memory"))
	if err != nil {
		return fmt.Errorf("--cache-max-memory: %w", err)
	}
	if _, err := mount.CheckTarget(target); err != nil {
		return err
	}
	if err := mount.CheckRootless(); err != nil {
		return err
	}
	// The memory cache is most of the heap: a soft limit a little above it
	// makes the GC work harder before RSS passes budget + 64 MiB.
	debug.SetMemoryLimit(memory + memorySlack)
	unpacked := unpackStore(c.String("cache-dir"))
	// The unpacked layers share --cache-max-disk with the chunk store.
	unpackedUsage := &cachedUsage{f: unpacked.Usage, every: time.Second}
	store, err := openStore(c, logger, lru.WithExternalUsage(unpackedUsage.get))
	if err != nil {
		return err
	}
	if store != nil {
		defer store.Close()
	}
	fopts, err := fetchOptions(c, logger)
	if err != nil {
		return err
	}
	if store != nil {
		fopts = append(fopts, fetcher.WithMetadataStore(store))
	}
	// The config comes in while the layers' TOCs do (see WaitConfig below).
	fopts = append(fopts, fetcher.WithLazyConfig())
	bandwidth, err := parseSize(c.String("background-bandwidth"))
	if err != nil {
		return fmt.Errorf("--background-bandwidth: %w", err)
	}
	if a := c.String("metrics-addr"); a != "" {
		if err := stats.CheckMetricsAddr(a); err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
	}
	recordPath := c.String("record")
	if recordPath != "" {
		if recordPath, err = filepath.Abs(recordPath); err != nil {
			return fmt.Errorf("--record: %w", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	pw := progressWriter(c.Bool("quiet"))
	prog := newProgress(pw)
	defer prog.done()
	prog.spin("resolving " + ref)
	img, err := fetcher.Resolve(ctx, ref, fopts...)
	if err != nil {
		return err
	}
	logger.Debug("resolved", "ref", ref, "digest", img.Digest, "layers", len(img.Layers))
	var copts []reader.CacheOption
	if store != nil {
		copts = append(copts, reader.WithStore(store))
		// Live mounts hold their layers, so `cache prune` leaves them.
		for _, l := range img.Layers {
			release, err := store.Hold(l.Digest.String())
			if err != nil {
				return err
			}
			defer release()
		}
	}
	cache := reader.NewCache(memory, copts...)
	defer cache.Close()
	demand := reader.NewDemand() // shared by the layers: on-demand reads go first
	opener := &layerOpener{
		img:        img,
		blobs:      layerBlobs(img),
		cache:      cache,
		store:      unpacked,
		skipVerify: c.Bool("insecure-skip-verify"),
		logger:     logger,
		opened:     prog.count("layers", len(img.Layers)),
		prog:       prog,
		extra:      []reader.Option{reader.WithDemand(demand), reader.WithOpaqueXattr(mount.OpaqueXattr())},
	}
	if c.Bool("prefetch") {
		// The prioritized region is requested while the TOC is parsed.
		opener.extra = append(opener.extra, reader.WithEarlyPrefetch())
	}
	lowers, err := opener.open(ctx)
	defer opener.release()
	unpackedUsage.invalidate() // counting the layers just unpacked
	if err != nil {
		return err
	}
	if err := img.WaitConfig(ctx); err != nil {
		return err
	}
	if disk, err := parseSize(c.String("cache-max-disk")); err == nil && store != nil {
		opener.enforceBound(store, disk)
	}
	// Prefetch, background fetch, stats and the access record concern the
	// lazily served layers; unpacked ones are local already.
	var layers []*reader.Layer
	var blobs []*fetcher.Blob
	for i, lw := range lowers {
		if lw.Layer != nil {
			layers = append(layers, lw.Layer)
			blobs = append(blobs, opener.blobs[i])
		}
	}
	if recordPath != "" {
		for _, l := range layers {
			l.Record()
		}
	}
	sess := newSession(ref, img, blobs, layers, prog, logger)
	defer sess.close("")
	sharedDir, err := shareLayers(c, lowers)
	if err != nil {
		return err
	}
	m, err := mount.MountLowers(ctx, lowers, target, mount.Options{
		StateDir:  c.String("cache-dir"),
		Writable:  c.Bool("writable"),
		Upper:     c.String("upper"),
		Work:      c.String("work"),
		Ref:       img.Ref.Context().Digest(img.Digest.String()).String(),
		Logger:    logger,
		SharedDir: sharedDir,
		// Saved copies live in the disk cache.
		Passthrough: c.Bool("passthrough") && store != nil,
	})
	if err != nil {
		return err
	}
	// Layers another process serves are fetched in the background there,
	// and were prefetched there.
	sess.borrow(m)
	// The prioritized regions are on their way since the TOCs came in
	// (reader.WithEarlyPrefetch); decoding them waits for the mount, which
	// needs the FUSE servers to answer and would otherwise queue behind
	// the decoding for the CPU.
	sess.startPrefetch(c.Bool("prefetch"))
	sess.waitPrefetch(c.Duration("prefetch-timeout"))
	if err := sess.publish(m.Target, c.String("metrics-addr")); err != nil {
		m.Close()
		return err
	}
	if mounted != nil {
		if err := mounted(img, m); err != nil {
			if cerr := m.Close(); cerr != nil {
				logger.Warn("unmount after failure", "err", cerr)
			}
			return err
		}
	}
	logger.Info("mounted", "ref", ref, "digest", img.Digest, "target", m.Target, "layers", len(lowers))
	if os.Getenv(progressFDEnv) != "" {
		// The waiting parent's terminal is not ours after ready.
		prog.done()
		sess.prog = nil
		if f, ok := pw.(*os.File); ok {
			f.Close()
		}
	}
	ready(nil)
	// Parsing TOCs leaves garbage several times the size of the trees
	// kept (the estargz library's entry structs): give it back to the OS
	// rather than hold it as RSS, once the mount has been idle a moment
	// (not while the program it was mounted for starts).
	go func() {
		if demand.WaitIdle(ctx, 200*time.Millisecond) == nil {
			debug.FreeOSMemory()
		}
	}()
	if c.Bool("background-fetch") {
		capacity := memory
		if store != nil {
			capacity += store.Max()
		}
		sess.startBackground(bandwidth, capacity)
	}

	werr := m.Wait(ctx)
	serr := sess.close(recordPath)
	if err := m.Close(); err != nil {
		return fmt.Errorf("unmount %s: %w", m.Target, err)
	}
	if werr != nil && !errors.Is(werr, context.Canceled) {
		return werr
	}
	logger.Info("unmounted", "target", m.Target)
	return serr
}

// shareLayers gives every lazily served layer of lowers its share key and
// returns the directory shared layer mounts live in, or "" with
// --share-layers=false or without root: fuse-overlayfs mounts are the
// user's own, and sharing their lowers is left for later.
func shareLayers(c *cli.Context, lowers []mount.Lower) (string, error) {
	if !c.Bool("share-layers") || mount.Rootless() {
		return "", nil
	}
	cacheDir, err := filepath.Abs(c.String("cache-dir"))
	if err != nil {
		return "", fmt.Errorf("--cache-dir: %w", err)
	}
	for i := range lowers {
		if l := lowers[i].Layer; l != nil {
			lowers[i].Share = shareKey(cacheDir, l.Name(), l.TOCDigest().String(), c.Bool("insecure-skip-verify"))
		}
	}
	return filepath.Join(stats.RuntimeDir(), "layers"), nil
}

// shareKey names a shared layer mount. Mounts share a layer when they
// would serve the same file system the same way: the same blob with the
// same TOC (the TOC digest is what lazy reads are verified against, not the
// blob digest, which only a whole download can check), verified or not,
// from the same cache dir (whose chunk store the server reads from).
func shareKey(cacheDir, layer, toc string, skipVerify bool) string {
	h := sha256.New()
	fmt.Fprintf(h, "stargz-mount shared layer v1\x00%s\x00%s\x00%s\x00%s\x00%t", cacheDir, layer, toc, mount.OpaqueXattr(), skipVerify)
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// memorySlack is what the process may use beyond --cache-max-memory before
// the Go runtime collects garbage aggressively: TOC trees, buffers of
// reads in flight, the runtime itself.
const memorySlack = 40 << 20

// unpackStore is the store of the layers unpacked in cacheDir for the
// overlay this process mounts with: kernel overlayfs as root,
// fuse-overlayfs otherwise (file whiteouts, user.overlay.opaque).
func unpackStore(cacheDir string) *unpack.Store {
	return unpack.NewStore(cacheDir, unpack.WithOpaqueXattr(mount.OpaqueXattr()), unpack.WithFileWhiteouts(mount.Rootless()))
}

// openStore opens the disk cache in the cache dir, or returns nil when
// --cache-max-disk is 0.
func openStore(c *cli.Context, logger *slog.Logger, opts ...lru.Option) (*lru.Store, error) {
	disk, err := parseSize(c.String("cache-max-disk"))
	if err != nil {
		return nil, fmt.Errorf("--cache-max-disk: %w", err)
	}
	if disk == 0 {
		return nil, nil
	}
	s, err := lru.Open(filepath.Join(c.String("cache-dir"), "chunks"), disk, append([]lru.Option{lru.WithLogger(logger)}, opts...)...)
	if err != nil {
		return nil, fmt.Errorf("--cache-dir: %w", err)
	}
	return s, nil
}

// daemonize starts this command again in the background and waits until it
// reports the mount ready or failed.
// Progress, if progress is set, is drawn on it until the mount is ready.
func daemonize(target, logPath string, progress io.Writer) error {
	if err := os.MkdirAll(filepath.Dir(logPath), 0o700); err != nil {
		return fmt.Errorf("--cache-dir: %w", err)
	}
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open daemon log: %w", err)
	}
	defer logFile.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.Stdin = devnull
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.ExtraFiles = []*os.File{w}
	if f, ok := progress.(*os.File); ok {
		cmd.ExtraFiles = append(cmd.ExtraFiles, f)
		cmd.Env = append(cmd.Env, progressFDEnv+"=4")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start background server: %w", err)
	}
	w.Close()
	msg, _ := io.ReadAll(r)
	switch s := strings.TrimSpace(string(msg)); {
	case s == "ready":
		cmd.Process.Release()
		return nil
	case s != "":
		cmd.Wait()
		return errors.New(s)
	default:
		err := cmd.Wait()
		return fmt.Errorf("background server for %s exited before the mount was ready: %v", target, err)
	}
}

// readyReporter returns a function that tells a waiting --daemon parent the
// outcome, once, and detaches from it.
func readyReporter(fd string) func(error) {
	n, err := strconv.Atoi(fd)
	if err != nil {
		return func(error) {}
	}
	// Processes this one starts (fusermount3, fuse-overlayfs) must not
	// hold the pipe open, or the parent never sees it close.
	syscall.CloseOnExec(n)
	f := os.NewFile(uintptr(n), "ready")
	done := false
	return func(err error) {
		if done || f == nil {
			return
		}
		done = true
		if err != nil {
			fmt.Fprintln(f, err)
		} else {
			fmt.Fprintln(f, "ready")
		}
		f.Close()
	}
}

func umountAction(c *cli.Context) error {
	a, err := args(c, "MOUNTPOINT")
	if err != nil {
		return err
	}
	logger, err := newLogger(c, os.Stderr)
	if err != nil {
		return err
	}
	if err := mount.Unmount(a[0], logger); err != nil {
		return err
	}
	// A server that was killed left its stats socket behind.
	if abs, err := filepath.Abs(a[0]); err == nil {
		os.Remove(stats.SocketPath(stats.RuntimeDir(), abs))
	}
	return nil
}

// layerInfo is one layer in `inspect` output.
type layerInfo struct {
	Digest           string `json:"digest"`
	MediaType        string `json:"mediaType"`
	Size             int64  `json:"size"`
	UncompressedSize int64  `json:"uncompressedSize,omitempty"`
	EStargz          bool   `json:"estargz"`
	Format           string `json:"format"` // how a mount uses it: estargz, zstd:chunked, gzip, zstd, uncompressed (unpacked) or unsupported
	TOCDigest        string `json:"tocDigest,omitempty"`
	Entries          int    `json:"entries,omitempty"`
	PrioritizedBytes int64  `json:"prioritizedBytes"`
	Error            string `json:"error,omitempty"`
}

type imageInfo struct {
	Reference string      `json:"reference"`
	Digest    string      `json:"digest"`
	Platform  string      `json:"platform"`
	Layers    []layerInfo `json:"layers"`
}

func inspectAction(c *cli.Context) error {
	a, err := args(c, "REF")
	if err != nil {
		return err
	}
	logger, err := newLogger(c, os.Stderr)
	if err != nil {
		return err
	}
	fopts, err := fetchOptions(c, logger)
	if err != nil {
		return err
	}
	ctx := c.Context
	img, err := fetcher.Resolve(ctx, a[0], fopts...)
	if err != nil {
		return err
	}
	info := imageInfo{Reference: img.Ref.String(), Digest: img.Digest.String(), Platform: platformString(img)}
	info.Layers = make([]layerInfo, len(img.Layers))
	cache := reader.NewCache(16 << 20)
	defer cache.Close()
	var g errgroup.Group
	for i, l := range img.Layers {
		li := &info.Layers[i]
		*li = layerInfo{Digest: l.Digest.String(), MediaType: string(l.MediaType), Size: l.Size, TOCDigest: l.Annotations[estargz.TOCJSONDigestAnnotation]}
		if s, err := strconv.ParseInt(l.Annotations[estargz.StoreUncompressedSizeAnnotation], 10, 64); err == nil {
			li.UncompressedSize = s
		}
		f, err := formatOf(i, l)
		if err != nil {
			li.Format, li.Error = "unsupported", err.Error()
			continue
		}
		li.Format = f.String()
		if f.zstdChunked {
			g.Go(func() error {
				rl, err := reader.OpenZstdChunked(ctx, img.Blob(l), digest.Digest(annotation(l, zstdChunkedChecksumAnnotations)),
					annotation(l, zstdChunkedPositionAnnotations), reader.WithName(l.Digest.String()), reader.WithCache(cache),
					reader.WithInsecureSkipVerify(true), reader.WithLogger(logger))
				if err != nil {
					li.Error = err.Error()
					return nil
				}
				li.TOCDigest = rl.TOCDigest().String()
				li.Entries = rl.Entries()
				return nil
			})
			continue
		}
		if f.compression != compressionGzip {
			continue
		}
		g.Go(func() error {
			rl, err := reader.Open(ctx, img.Blob(l), reader.WithName(l.Digest.String()), reader.WithCache(cache),
				reader.WithInsecureSkipVerify(true), reader.WithLogger(logger))
			if err != nil {
				li.Error = err.Error()
				return nil
			}
			li.EStargz = true
			if li.TOCDigest != "" && li.TOCDigest != rl.TOCDigest().String() {
				li.Error = fmt.Sprintf("TOC digest %s does not match the annotation", rl.TOCDigest())
			}
			li.TOCDigest = rl.TOCDigest().String()
			li.Entries = rl.Entries()
			li.PrioritizedBytes = rl.PrefetchBytes()
			return nil
		})
	}
	g.Wait()
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(info)
	}
	w := c.App.Writer
	fmt.Fprintf(w, "Reference: %s\nDigest:    %s\nPlatform:  %s\n\n", info.Reference, info.Digest, info.Platform)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tDIGEST\tMEDIA TYPE\tFORMAT\tSIZE\tUNCOMPRESSED\tESTARGZ\tENTRIES\tPRIORITIZED\tTOC DIGEST")
	for i, l := range info.Layers {
		unc := "-"
		if l.UncompressedSize > 0 {
			unc = sizeString(l.UncompressedSize)
		}
		es := "no"
		if l.EStargz {
			es = "yes"
		}
		toc := l.TOCDigest
		if toc == "" {
			toc = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", i, shortDigest(l.Digest), l.MediaType, l.Format,
			sizeString(l.Size), unc, es, l.Entries, sizeString(l.PrioritizedBytes), shortDigest(toc))
	}
	tw.Flush()
	for i, l := range info.Layers {
		if l.Error != "" {
			fmt.Fprintf(w, "layer %d: %s\n", i, l.Error)
		}
	}
	return nil
}

func platformString(img *fetcher.Image) string {
	p := img.Platform.OS + "/" + img.Platform.Architecture
	if img.Platform.Variant != "" {
		p += "/" + img.Platform.Variant
	}
	return p
}

func shortDigest(d string) string {
	if _, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return d[:len(d)-len(hex)] + hex[:12]
	}
	return d
}
