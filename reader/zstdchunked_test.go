package reader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

func TestZstdChunked(t *testing.T) {
	big := lt.Random("zc", 300<<10)
	entries := []lt.Entry{
		lt.Dir("etc"),
		lt.FileString("etc/motd", "hello\n"),
		lt.File("big", big),
		lt.Dir("d"),
		lt.Whiteout("d/gone"),
		lt.Symlink("link", "etc/motd"),
	}
	zb, err := lt.ZstdChunked(lt.Tar(entries...), estargz.WithChunkSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	checksum := digest.Digest(zb.Extra[lt.ZstdChunkedChecksumAnnotation])
	position := zb.Extra[lt.ZstdChunkedPositionAnnotation]
	if checksum == "" || position == "" {
		t.Fatalf("annotations missing: %v", zb.Extra)
	}
	var off, length, raw, typ int64
	fmt.Sscanf(position, "%d:%d:%d:%d", &off, &length, &raw, &typ)

	tests := []struct {
		name     string
		data     func() []byte
		checksum digest.Digest
		position string
		openErr  string
		readErr  error // of big
	}{
		{name: "estargz library footer", data: func() []byte { return zb.Data }},
		{name: "containers/storage footer", data: func() []byte {
			// Drop the 48-byte footer frame (8-byte header + 40) and append a
			// 64-byte one with containers/storage's magic: the annotations
			// alone locate the TOC.
			d := append([]byte{}, zb.Data[:len(zb.Data)-48]...)
			footer := make([]byte, 64)
			copy(footer[56:], "GNUlInUx")
			return append(append(d, 0x50, 0x2a, 0x4d, 0x18, 64, 0, 0, 0), footer...)
		}},
		{name: "wrong checksum", checksum: digest.FromString("other"), openErr: "does not match"},
		{name: "tampered TOC", data: func() []byte {
			d := append([]byte{}, zb.Data...)
			d[off+length/2] ^= 1
			return d
		}, openErr: "does not match"},
		{name: "position outside the blob", position: fmt.Sprintf("%d:%d:%d:1", off, int64(len(zb.Data)), raw), openErr: "outside"},
		{name: "unknown TOC type", position: fmt.Sprintf("%d:%d:%d:2", off, length, raw), openErr: "type 2"},
		{name: "malformed position", position: "1:2:3", openErr: "want offset"},
		{name: "tampered chunk", readErr: ErrCorrupt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := zb.Data
			if tt.data != nil {
				data = tt.data()
			}
			cs, pos := checksum, position
			if tt.checksum != "" {
				cs = tt.checksum
			}
			if tt.position != "" {
				pos = tt.position
			}
			b := &memBlob{data: data}
			l, err := OpenZstdChunked(context.Background(), b, cs, pos, WithName("zc"))
			if tt.openErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.openErr) {
					t.Fatalf("OpenZstdChunked = %v, want error with %q", err, tt.openErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			n := lookup(t, l, "big")
			if tt.readErr != nil {
				// Flip a byte inside big's second chunk frame.
				c := n.chunks[1]
				b.data = append([]byte{}, data...)
				b.data[c.blobOff+(c.blobEnd-c.blobOff)/2] ^= 0xff
				_, err := l.ReadAt(context.Background(), n, make([]byte, 10), c.off)
				if !errors.Is(err, tt.readErr) {
					t.Fatalf("read of a tampered chunk: %v, want %v", err, tt.readErr)
				}
				// Other chunks still read.
				if _, err := l.ReadAt(context.Background(), n, make([]byte, 10), 0); err != nil {
					t.Errorf("read of an intact chunk: %v", err)
				}
				return
			}
			if len(n.chunks) < 4 {
				t.Errorf("big has %d chunks, want several", len(n.chunks))
			}
			if got := readAll(t, l, n); !bytes.Equal(got, big) {
				t.Errorf("big differs")
			}
			if got := readAll(t, l, lookup(t, l, "etc", "motd")); string(got) != "hello\n" {
				t.Errorf("motd = %q", got)
			}
			if n := lookup(t, l, "d", "gone"); n.Mode&os.ModeCharDevice == 0 || n.Major != 0 || n.Minor != 0 {
				t.Errorf("whiteout: mode %v dev %d:%d", n.Mode, n.Major, n.Minor)
			}
			if n := lookup(t, l, "link"); n.Link != "etc/motd" {
				t.Errorf("link -> %q", n.Link)
			}
		})
	}
	t.Run("no checksum needs skip-verify", func(t *testing.T) {
		_, err := OpenZstdChunked(context.Background(), &memBlob{data: zb.Data}, "", position)
		if !errors.Is(err, ErrNoTOCDigest) {
			t.Errorf("err = %v, want ErrNoTOCDigest", err)
		}
		if _, err := OpenZstdChunked(context.Background(), &memBlob{data: zb.Data}, "", position, WithInsecureSkipVerify(true)); err != nil {
			t.Errorf("with skip-verify: %v", err)
		}
	})
}
