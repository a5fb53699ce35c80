// Command demo serves a small eStargz image from an in-process registry for
// `make demo`: it packs a directory into two eStargz layers, pushes them to
// go-containerregistry's registry on a loopback port, prints the image
// reference and serves until interrupted.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/stargz-mount/stargz-mount/internal/layertest"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "registry listen `address`")
	base := flag.String("base", "testdata/demo/rootfs", "`DIR` packed as the bottom layer")
	top := flag.String("top", "", "`DIR` packed as the top layer")
	chunk := flag.Int("chunk", 64<<10, "eStargz chunk size in `BYTES`")
	flag.Parse()
	if err := run(*addr, *base, *top, *chunk); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(addr, base, top string, chunk int) error {
	var blobs []*layertest.Blob
	for _, dir := range []string{base, top} {
		if dir == "" {
			continue
		}
		t, err := tarDir(dir)
		if err != nil {
			return err
		}
		b, err := layertest.Estargz(t, estargz.WithChunkSize(chunk))
		if err != nil {
			return fmt.Errorf("convert %s to eStargz: %w", dir, err)
		}
		blobs = append(blobs, b)
	}
	img, err := layertest.Image(blobs...)
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	go srv.Serve(l)
	ref, err := name.ParseReference(l.Addr().String() + "/demo:latest")
	if err != nil {
		return err
	}
	if err := remote.Write(ref, img); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	fmt.Println(ref)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return srv.Close()
}

// tarDir packs dir into a tar with root-owned entries, parents first.
func tarDir(dir string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		h.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			h.Name += "/"
		}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "root", "root"
		h.ModTime = h.ModTime.Truncate(1e9)
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(tw, f)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", dir, err)
	}
	return buf.Bytes(), tw.Close()
}
