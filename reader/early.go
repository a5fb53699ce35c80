package reader

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"path"
	"sync"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// Early prefetch. Parsing a large TOC and building the tree takes tens of
// milliseconds; with WithEarlyPrefetch, the request for the prioritized
// region leaves as soon as the TOC's digest is checked, its end found by
// a scan of the TOC JSON for the landmark, and its bytes arrive while the
// TOC is parsed and the layer mounted. Prefetch then decodes and verifies
// the chunks against the TOC as always. The region is only a byte range
// of the blob: nothing in it is served before it is verified. (Its gzip
// members were once also decompressed as they arrived, before the tree
// existed; on two cores that slowed parsing and mounting more than it
// saved: the mount was ready 50 ms later.)

// WithEarlyPrefetch starts fetching the prioritized region while the TOC
// is parsed, for Prefetch to use, when the TOC comes from the registry
// (one from the Store means an earlier mount, whose chunks are likely
// cached). Use it only when Prefetch will be called. The default is off.
func WithEarlyPrefetch() Option { return func(o *options) { o.earlyPrefetch = true } }

// landmarkOffset finds the prefetch landmark's blob offset in TOC JSON
// without parsing all of it: the object around the first name that ends
// in ".prefetch.landmark". It returns 0 if there is none or it cannot
// tell.
func landmarkOffset(tocJSON []byte) int64 {
	i := bytes.Index(tocJSON, []byte(`.prefetch.landmark"`))
	if i < 0 {
		return 0
	}
	start := bytes.LastIndexByte(tocJSON[:i], '{')
	end := bytes.IndexByte(tocJSON[i:], '}')
	if start < 0 || end < 0 {
		return 0
	}
	var e estargz.TOCEntry
	if json.Unmarshal(tocJSON[start:i+end+1], &e) != nil {
		return 0
	}
	if path.Clean("/"+e.Name) != "/"+estargz.PrefetchLandmark || e.Offset <= 0 {
		return 0
	}
	return e.Offset
}

// region is a range of the blob being read into buf in the background.
type region struct {
	off    int64
	buf    []byte
	cancel context.CancelFunc

	mu   sync.Mutex // guards got and err
	cond *sync.Cond // signalled when got or err changes
	got  int64      // bytes of buf read so far
	err  error      // set when the read failed

}

// maxEarlyRegion bounds the prioritized region fetched early (held whole
// in memory until Prefetch takes it); a larger one is left to Prefetch,
// which holds a segment at a time.
const maxEarlyRegion = 16 << 20

// startRegion reads n bytes of b at off in the background, in one
// request.
func startRegion(b Blob, off, n int64) *region {
	ctx, cancel := context.WithCancel(context.Background())
	r := &region{off: off, buf: make([]byte, n), cancel: cancel}
	r.cond = sync.NewCond(&r.mu)
	go r.read(ctx, b)
	return r
}

func (r *region) read(ctx context.Context, b Blob) {
	set := func(got int64, err error) {
		r.mu.Lock()
		r.got, r.err = got, err
		r.mu.Unlock()
		r.cond.Broadcast()
	}
	rs, ok := b.(rangeStreamer)
	if !ok {
		if err := readFull(ctx, b, r.buf, r.off); err != nil {
			set(0, err)
			return
		}
		set(int64(len(r.buf)), nil)
		return
	}
	rc, err := rs.OpenRange(ctx, r.off, int64(len(r.buf)))
	if err != nil {
		set(0, err)
		return
	}
	defer rc.Close()
	const piece = 256 << 10
	for got := int64(0); got < int64(len(r.buf)); {
		k, err := io.ReadFull(rc, r.buf[got:min(got+piece, int64(len(r.buf)))])
		got += int64(k)
		if err != nil {
			set(got, err)
			return
		}
		set(got, nil)
	}
}

// fill waits until buf[:n] is read, or the read failed first.
func (r *region) fill(n int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.got < n && r.err == nil {
		r.cond.Wait()
	}
	if r.got >= n {
		return nil
	}
	return r.err
}

// DropEarlyPrefetch cancels the prefetch WithEarlyPrefetch started, for a
// layer whose Prefetch will not be called (another process serves it).
func (l *Layer) DropEarlyPrefetch() {
	if r := l.takeEarly(); r != nil {
		r.cancel() // the decoder stops with the read
	}
}

// takeEarly hands over the early region, once.
func (l *Layer) takeEarly() *region {
	l.earlyMu.Lock()
	defer l.earlyMu.Unlock()
	r := l.early
	l.early = nil
	return r
}
