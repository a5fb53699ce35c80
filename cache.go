package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/stargz-mount/stargz-mount/lru"
	"github.com/stargz-mount/stargz-mount/unpack"
)

// metaGroup is the disk cache group of manifests, configs and resolved
// references (see fetcher.MetadataStore).
const metaGroup = "meta"

func cacheCommand() *cli.Command {
	dir := &cli.StringFlag{Name: "cache-dir", Value: defaultCacheDir(), Usage: "`DIR` of the cache"}
	return &cli.Command{
		Name:  "cache",
		Usage: "show or prune the disk cache",
		Subcommands: []*cli.Command{
			{
				Name:   "ls",
				Usage:  "list what is cached, per layer",
				Flags:  []cli.Flag{dir, &cli.BoolFlag{Name: "json", Usage: "print JSON instead of a table"}},
				Action: cacheLs,
			},
			{
				Name:   "du",
				Usage:  "print the disk space the cache uses",
				Flags:  []cli.Flag{dir},
				Action: cacheDu,
			},
			{
				Name:  "prune",
				Usage: "remove cached data no live mount needs, least recently used first",
				Description: `Without flags, prunes down to --max (default 10GiB, as --cache-max-disk).
Layers of live mounts are never removed; --all removes everything else.`,
				Flags: []cli.Flag{dir,
					&cli.BoolFlag{Name: "all", Usage: "remove every layer and all metadata no live mount holds"},
					&cli.StringFlag{Name: "max", Value: "10GiB", Usage: "prune until the cache uses at most `SIZE`"},
				},
				Action: cachePrune,
			},
		},
	}
}

// openCache opens the disk cache of --cache-dir for inspection; it evicts
// nothing by itself.
func openCache(c *cli.Context) (*lru.Store, error) {
	if _, err := args(c); err != nil {
		return nil, err
	}
	s, err := lru.Open(filepath.Join(c.String("cache-dir"), "chunks"), 1<<62)
	if err != nil {
		return nil, fmt.Errorf("open cache: %w", err)
	}
	return s, nil
}

// cachedLayer is one line of `cache ls`.
type cachedLayer struct {
	lru.Group
	Kind string `json:"kind"` // "layer" or "metadata"
}

func cacheLs(c *cli.Context) error {
	s, err := openCache(c)
	if err != nil {
		return err
	}
	defer s.Close()
	groups, err := s.Groups()
	if err != nil {
		return err
	}
	out := make([]cachedLayer, 0, len(groups))
	for _, g := range groups {
		kind := "layer"
		if g.Name == metaGroup {
			kind = "metadata"
		}
		out = append(out, cachedLayer{g, kind})
	}
	unpacked, err := unpackStore(c.String("cache-dir")).Layers()
	if err != nil {
		return err
	}
	for _, l := range unpacked {
		out = append(out, cachedLayer{lru.Group{Name: l.Digest, Entries: 1, Bytes: l.Bytes, LastUsed: l.LastUsed, InUse: l.InUse}, "unpacked"})
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tENTRIES\tSIZE\tLAST USED\tIN USE")
	for _, g := range out {
		name := g.Name
		switch g.Kind {
		case "metadata":
			name = "(manifests, configs, tags)"
		case "unpacked":
			name += " (unpacked)"
		}
		inUse := "no"
		if g.InUse {
			inUse = "yes"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", name, g.Entries, sizeString(g.Bytes), g.LastUsed.Local().Format(time.DateTime), inUse)
	}
	return tw.Flush()
}

func cacheDu(c *cli.Context) error {
	s, err := openCache(c)
	if err != nil {
		return err
	}
	defer s.Close()
	n, err := s.Usage()
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "%s\t%d bytes\t%s\n", sizeString(n), n, s.Dir())
	us := unpackStore(c.String("cache-dir"))
	u, err := us.Usage()
	if err != nil {
		return err
	}
	dir, _ := us.Path("sha256:" + strings.Repeat("0", 64))
	fmt.Fprintf(c.App.Writer, "%s\t%d bytes\t%s\n", sizeString(u), u, filepath.Dir(dir))
	return nil
}

func cachePrune(c *cli.Context) error {
	s, err := openCache(c)
	if err != nil {
		return err
	}
	defer s.Close()
	var freed int64
	var busy []string
	us := unpackStore(c.String("cache-dir"))
	if c.Bool("all") {
		layers, err := us.Layers()
		if err != nil {
			return err
		}
		for _, l := range layers {
			n, err := us.Remove(l.Digest)
			if errors.Is(err, unpack.ErrBusy) {
				busy = append(busy, l.Digest)
				continue
			}
			if err != nil {
				return err
			}
			freed += n
		}
		groups, err := s.Groups()
		if err != nil {
			return err
		}
		for _, g := range groups {
			n, err := s.RemoveGroup(g.Name)
			if errors.Is(err, lru.ErrBusy) {
				busy = append(busy, g.Name)
				continue
			}
			if err != nil {
				return err
			}
			freed += n
		}
	} else {
		max, err := parseSize(c.String("max"))
		if err != nil {
			return fmt.Errorf("--max: %w", err)
		}
		// Unpacked layers (whole layers, the bigger items) go first, down
		// to what the chunk store leaves of the bound.
		chunks, err := s.Usage()
		if err != nil {
			return err
		}
		if freed, err = us.Prune(max - min(max, chunks)); err != nil {
			return err
		}
		u, err := us.Usage()
		if err != nil {
			return err
		}
		n, err := s.Prune(max - min(max, u))
		if err != nil {
			return err
		}
		freed += n
	}
	left, _ := s.Usage()
	if u, err := us.Usage(); err == nil {
		left += u
	}
	fmt.Fprintf(c.App.Writer, "freed %s, %s left", sizeString(freed), sizeString(left))
	if len(busy) > 0 {
		fmt.Fprintf(c.App.Writer, " (kept %d layer(s) of live mounts: %s)", len(busy), strings.Join(busy, ", "))
	}
	fmt.Fprintln(c.App.Writer)
	return nil
}
