package reader

import (
	"bytes"
	"compress/gzip"
	"io"
	"math/rand/v2"
	"testing"
)

// gzipMember compresses data as one gzip member at level, with header
// fields set when named.
func gzipMember(t testing.TB, data []byte, level int, named bool) []byte {
	var b bytes.Buffer
	zw, err := gzip.NewWriterLevel(&b, level)
	if err != nil {
		t.Fatal(err)
	}
	if named {
		zw.Name, zw.Comment, zw.Extra = "name", "comment", []byte("extra")
	}
	zw.Write(data)
	zw.Close()
	return b.Bytes()
}

// inflate is what the general path returns: size bytes at inner.
func inflate(comp []byte, inner, size int64) ([]byte, bool) {
	zr, err := gzip.NewReader(bytes.NewReader(comp))
	if err != nil {
		return nil, false
	}
	if _, err := io.CopyN(io.Discard, zr, inner); err != nil {
		return nil, false
	}
	out := make([]byte, size)
	if _, err := io.ReadFull(zr, out); err != nil {
		return nil, false
	}
	return out, true
}

func TestStoredChunk(t *testing.T) {
	rnd := make([]byte, 300_000) // several stored blocks of at most 65535 bytes
	r := rand.New(rand.NewPCG(1, 2))
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	text := bytes.Repeat([]byte("compressible "), 20_000)
	corruptLen := gzipMember(t, rnd, gzip.NoCompression, false)
	corruptLen[10+3] ^= 1 // NLEN of the first block no longer ^LEN
	tests := []struct {
		name        string
		comp        []byte
		inner, size int64
		stored      bool // storedChunk answers (else the general path must)
	}{
		{"random, level 0, whole", gzipMember(t, rnd, gzip.NoCompression, false), 0, 300_000, true},
		{"random, default level, whole", gzipMember(t, rnd, gzip.DefaultCompression, false), 0, 300_000, true},
		{"random, across blocks", gzipMember(t, rnd, gzip.BestSpeed, false), 65_000, 140_000, true},
		{"random, inside one block", gzipMember(t, rnd, gzip.NoCompression, false), 10, 100, true},
		{"random, to the end", gzipMember(t, rnd, gzip.NoCompression, false), 299_000, 1000, true},
		{"random, empty chunk", gzipMember(t, rnd, gzip.NoCompression, false), 5, 0, true},
		{"header with name, comment, extra", gzipMember(t, rnd, gzip.NoCompression, true), 1, 299_999, true},
		{"compressible data", gzipMember(t, text, gzip.DefaultCompression, false), 0, 1000, false},
		{"chunk past the member's end", gzipMember(t, rnd, gzip.NoCompression, false), 299_000, 1001, false},
		{"truncated member", gzipMember(t, rnd, gzip.NoCompression, false)[:100_000], 0, 300_000, false},
		{"corrupt block length", corruptLen, 0, 300_000, false},
		{"not gzip", rnd[:1000], 0, 10, false},
		{"empty", nil, 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := storedChunk(tt.comp, tt.inner, tt.size)
			if ok != tt.stored {
				t.Fatalf("storedChunk answered %v, want %v", ok, tt.stored)
			}
			if !ok {
				return
			}
			want, wok := inflate(tt.comp, tt.inner, tt.size)
			if !wok || !bytes.Equal(got, want) {
				t.Fatalf("storedChunk gave %d bytes that differ from flate's %d (flate ok %v)", len(got), len(want), wok)
			}
		})
	}
}

// FuzzStored holds storedChunk to flate: whatever it answers, flate gives
// the same bytes.
func FuzzStored(f *testing.F) {
	f.Add(gzipMember(f, []byte("hello, stored world"), gzip.NoCompression, false), int64(0), int64(5))
	f.Add(gzipMember(f, bytes.Repeat([]byte{7, 1, 200}, 30_000), gzip.NoCompression, true), int64(65_530), int64(20))
	f.Fuzz(func(t *testing.T, comp []byte, inner, size int64) {
		if inner < 0 || size < 0 || inner > 1<<20 || size > 1<<20 {
			return
		}
		got, ok := storedChunk(comp, inner, size)
		if !ok {
			return
		}
		want, wok := inflate(comp, inner, size)
		if !wok || !bytes.Equal(got, want) {
			t.Fatalf("storedChunk gave bytes flate does not (flate ok %v)", wok)
		}
	})
}
