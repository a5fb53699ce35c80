package reader

import (
	"bytes"
	"context"
	"io"
	"testing"

	lt "github.com/stargz-mount/stargz-mount/internal/layertest"
)

func TestReadSlice(t *testing.T) {
	data := lt.Random("slice", 200_000)
	blob, d := build(t, 64<<10, lt.File("f", data), lt.FileString("empty", ""))
	l := open(t, blob, d)
	f := lookup(t, l, "f")
	tests := []struct {
		name      string
		off       int64
		size      int
		want      []byte
		eof       bool
		noCopyHit bool
	}{
		{"within the first chunk", 100, 1000, data[100:1100], false, true},
		{"a whole chunk", 64 << 10, 64 << 10, data[64<<10 : 128<<10], false, true},
		{"across chunks", 60 << 10, 10 << 10, data[60<<10 : 70<<10], false, false},
		{"to the end", 199_000, 1000, data[199_000:], false, true},
		{"past the end in the last chunk", 199_000, 4096, data[199_000:], true, true},
		{"past the end across chunks", 120_000, 100_000, data[120_000:], true, false},
		{"at the end", 200_000, 10, []byte{}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := l.ReadSlice(context.Background(), f, tt.off, tt.size)
			if (err == io.EOF) != tt.eof || (err != nil && err != io.EOF) {
				t.Fatalf("err = %v, want EOF %v", err, tt.eof)
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("got %d bytes, want %d", len(got), len(tt.want))
			}
			// Slices of the cached chunk alias each other; copies do not.
			again, _ := l.ReadSlice(context.Background(), f, tt.off, tt.size)
			if aliased := len(got) > 0 && &got[0] == &again[0]; aliased != tt.noCopyHit {
				t.Errorf("aliases the cache: %v, want %v", aliased, tt.noCopyHit)
			}
		})
	}
	if got, err := l.ReadSlice(context.Background(), lookup(t, l, "empty"), 0, 10); len(got) != 0 || err != io.EOF {
		t.Errorf("empty file: %d bytes, %v", len(got), err)
	}
}
