package reader

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path"
	"sync"
	"sync/atomic"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/klauspost/compress/gzip"
)

// Early prefetch. Parsing a large TOC and building the tree takes tens of
// milliseconds; with WithEarlyPrefetch, the request for the prioritized
// region leaves as soon as the TOC's digest is checked, its end found by
// a scan of the TOC JSON for the landmark, and the gzip members it brings
// are decompressed, one after the other, as they arrive: gzip members end
// themselves, so that needs no TOC. Prefetch then verifies each chunk
// against the TOC as always and decodes what the early decoder had not
// reached. The region is only a byte range of the blob and the members
// only its bytes decompressed: nothing is served before it is verified.

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

	dmu     sync.Mutex       // guards members
	members map[int64][]byte // decompressed gzip members, by blob offset
	dstop   atomic.Bool      // stop decoding members
}

// maxEarlyRegion bounds the prioritized region fetched early (held whole
// in memory until Prefetch takes it); a larger one is left to Prefetch,
// which holds a segment at a time. maxEarlyDecode bounds the bytes the
// early decoder decompresses; past it, Prefetch decodes the rest.
const (
	maxEarlyRegion = 16 << 20
	maxEarlyDecode = 32 << 20
)

// startRegion reads n bytes of b at off in the background, in one
// request, and with gzip set decompresses its gzip members meanwhile.
func startRegion(b Blob, off, n int64, gzip bool) *region {
	ctx, cancel := context.WithCancel(context.Background())
	r := &region{off: off, buf: make([]byte, n), cancel: cancel, members: map[int64][]byte{}}
	r.cond = sync.NewCond(&r.mu)
	go r.read(ctx, b)
	if gzip {
		go r.decodeMembers()
	}
	return r
}

// available waits until buf[:n] is read or the read failed, and returns
// how much of buf is read.
func (r *region) available(n int64) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.got < n && r.err == nil {
		r.cond.Wait()
	}
	return r.got
}

// decodeMembers decompresses the region's gzip members in order as their
// bytes arrive, until the region ends, something does not decode, the
// budget is spent or Prefetch says stop. A member not all here yet is
// tried again once twice as many bytes are.
func (r *region) decodeMembers() {
	const step = 256 << 10
	size := int64(len(r.buf))
	var zr gzip.Reader
	var total int64
	pos := int64(0)
	want := min(step, size)
	for pos < size && !r.dstop.Load() {
		avail := r.available(want)
		if avail <= pos {
			return // the read failed
		}
		br := bytes.NewReader(r.buf[pos:avail])
		err := zr.Reset(br)
		var data []byte
		if err == nil {
			zr.Multistream(false)
			data, err = io.ReadAll(io.LimitReader(&zr, maxEarlyDecode-total+1))
		}
		if err != nil {
			if avail == size {
				return // Prefetch decodes it, and reports what is wrong
			}
			want = min(pos+2*(avail-pos), size) // not all here yet
			continue
		}
		if total += int64(len(data)); total > maxEarlyDecode {
			return
		}
		r.dmu.Lock()
		r.members[r.off+pos] = data
		r.dmu.Unlock()
		pos = avail - int64(br.Len())
		want = min(max(want, pos+step), size)
	}
}

// decoded stops the early decoder and returns the members it decoded.
func (r *region) decoded() map[int64][]byte {
	r.dstop.Store(true)
	r.dmu.Lock()
	defer r.dmu.Unlock()
	m := r.members
	r.members = map[int64][]byte{}
	return m
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

// verifyChunk returns chunk c from m, the decompressed gzip member it lies
// in, after checking it as readChunk does.
func verifyChunk(c *chunk, m []byte) ([]byte, error) {
	if c.inner < 0 || c.inner+c.size > int64(len(m)) {
		return nil, fmt.Errorf("%w: gzip member at %d holds less than the %d bytes the TOC declares", ErrCorrupt, c.blobOff, c.size)
	}
	data := m[c.inner : c.inner+c.size : c.inner+c.size]
	if err := verifyDigest(c, data); err != nil {
		return nil, err
	}
	return data, nil
}
