package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/stargz-mount/stargz-mount/stats"
)

// rootRuntimeDir is where root's mounts keep their sockets.
const rootRuntimeDir = "/run/stargz-mount"

func statsCommand() *cli.Command {
	return &cli.Command{
		Name:      "stats",
		Usage:     "show per-layer fetch and cache statistics of a mounted image",
		ArgsUsage: "MOUNTPOINT",
		Flags:     []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON (a \"layers\" array) instead of a table"}},
		Action:    statsAction,
	}
}

func statsAction(c *cli.Context) error {
	a, err := args(c, "MOUNTPOINT")
	if err != nil {
		return err
	}
	target, err := filepath.Abs(a[0])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 10*time.Second)
	defer cancel()
	snap, err := stats.Get(ctx, stats.SocketPath(stats.RuntimeDir(), target))
	if errors.Is(err, stats.ErrNoServer) && stats.RuntimeDir() != rootRuntimeDir {
		// A user asking about a mount root made.
		if s, rerr := stats.Get(ctx, stats.SocketPath(rootRuntimeDir, target)); rerr == nil {
			snap, err = s, nil
		}
	}
	if errors.Is(err, stats.ErrNoServer) {
		return fmt.Errorf("%s is not an image mounted by a running stargz-mount (no stats socket in %s)", a[0], stats.RuntimeDir())
	}
	if err != nil {
		return err
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(snap)
	}
	return stats.WriteTable(c.App.Writer, *snap)
}
