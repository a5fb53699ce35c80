package reader

import (
	"bytes"
	"testing"
)

// TestWindow: chunk bytes come out right whether chunks follow each
// other, leave gaps, share bytes or go backwards (an error).
func TestWindow(t *testing.T) {
	blob := make([]byte, 1000)
	for i := range blob {
		blob[i] = byte(i * 7)
	}
	const base = 100 // the stream starts at blob offset base
	steps := []struct {
		name     string
		from, to int64
		err      bool
	}{
		{"first chunk", 100, 200, false},
		{"next chunk", 200, 260, false},
		{"after a gap", 300, 400, false},
		{"same bytes again", 300, 400, false},
		{"within the last", 320, 350, false},
		{"overlapping the last", 350, 600, false},
		{"larger than any before", 600, 1000, false},
		{"backwards", 500, 550, true},
	}
	w := window{r: bytes.NewReader(blob[base:]), off: base, pos: base}
	for _, s := range steps {
		got, err := w.bytes(s.from, s.to)
		if (err != nil) != s.err {
			t.Fatalf("%s: err %v, want error %v", s.name, err, s.err)
		}
		if err == nil && !bytes.Equal(got, blob[s.from:s.to]) {
			t.Fatalf("%s: wrong bytes", s.name)
		}
	}
	w = window{r: bytes.NewReader(blob[base:200]), off: base, pos: base}
	if _, err := w.bytes(150, 250); err == nil {
		t.Fatal("a stream ending early gave no error")
	}
}
