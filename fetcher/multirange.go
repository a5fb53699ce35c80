package fetcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"sort"
	"strings"

	"golang.org/x/sync/errgroup"
)

// Range is one piece of a blob to read: len(P) bytes at Off.
type Range struct {
	Off int64
	P   []byte
}

// ReadRangesAt reads len(bufs[i]) bytes at offs[i] for every i: ReadRanges
// with plain types, for callers that do not import this package.
func (b *Blob) ReadRangesAt(ctx context.Context, offs []int64, bufs [][]byte) error {
	if len(offs) != len(bufs) {
		return fmt.Errorf("read %s: %d offsets for %d buffers", b.digest, len(offs), len(bufs))
	}
	ranges := make([]Range, len(offs))
	for i := range offs {
		ranges[i] = Range{Off: offs[i], P: bufs[i]}
	}
	return b.ReadRanges(ctx, ranges)
}

// ReadRanges fills every range, in one multi-range request
// (multipart/byteranges) where the registry supports it. A registry that
// answers a multi-range request with the whole blob (200), 400 or 416 is
// remembered as not supporting them (so is one answering a single range
// that does not cover them all), and the ranges are read with one
// request each, in parallel, from then on. Ranges must lie within the blob
// and not overlap, in ascending order.
func (b *Blob) ReadRanges(ctx context.Context, ranges []Range) error {
	for _, r := range ranges {
		if r.Off < 0 || r.Off+int64(len(r.P)) > b.size {
			return fmt.Errorf("read %s: range %d+%d outside the %d-byte blob", b.digest, r.Off, len(r.P), b.size)
		}
	}
	if len(ranges) > 1 && !b.noMultiRange.Load() {
		what := fmt.Sprintf("%s@%s %d ranges %d-%d", b.img.repo, b.digest, len(ranges), ranges[0].Off, ranges[len(ranges)-1].Off+int64(len(ranges[len(ranges)-1].P))-1)
		err := b.retry(ctx, what, func(ctx context.Context) error { return b.getMulti(ctx, ranges, what) })
		if !errors.Is(err, errNoMultiRange) {
			return err
		}
		b.img.logger.Debug("registry does not serve multi-range requests; reading ranges one by one", "blob", b.digest)
	}
	g, gctx := errgroup.WithContext(ctx)
	for _, r := range ranges {
		g.Go(func() error {
			_, err := b.ReadAtContext(gctx, r.P, r.Off)
			if err == io.EOF {
				err = nil
			}
			return err
		})
	}
	return g.Wait()
}

// errNoMultiRange: the registry does not do multi-range requests.
var errNoMultiRange = errors.New("registry does not serve multi-range requests")

func (b *Blob) getMulti(ctx context.Context, ranges []Range, what string) error {
	specs := make([]string, len(ranges))
	for i, r := range ranges {
		specs[i] = fmt.Sprintf("%d-%d", r.Off, r.Off+int64(len(r.P))-1)
	}
	resp, progress, done, err := b.open(ctx, "bytes="+strings.Join(specs, ","))
	if err != nil {
		return b.classify(what, err)
	}
	defer done()
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK, http.StatusBadRequest, http.StatusRequestedRangeNotSatisfiable:
		b.noMultiRange.Store(true)
		return &Error{Op: "read blob", Ref: what, Kind: KindBadResponse, Err: fmt.Errorf("%w (HTTP %s)", errNoMultiRange, resp.Status)}
	default:
		return statusError(what, resp)
	}
	body := &progressReader{resp.Body, progress}
	filled := make([]int64, len(ranges))
	mt, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/byteranges" {
		// One range covering all asked for: the server merged them.
		start, end, err := contentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return &Error{Op: "read blob", Ref: what, Kind: KindTransient, Err: fmt.Errorf("206 without multipart body or Content-Range: %v", err)}
		}
		last := ranges[len(ranges)-1]
		if start > ranges[0].Off || end < last.Off+int64(len(last.P))-1 {
			// Only some of the ranges (some registries take the first
			// and ignore the rest): no multi-range support.
			b.noMultiRange.Store(true)
			return &Error{Op: "read blob", Ref: what, Kind: KindBadResponse,
				Err: fmt.Errorf("%w (answered with one range, %s)", errNoMultiRange, resp.Header.Get("Content-Range"))}
		}
		if err := b.fillPart(body, start, end, ranges, filled); err != nil {
			return b.classify(what, err)
		}
	} else {
		mr := multipart.NewReader(body, params["boundary"])
		for {
			part, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				return b.classify(what, fmt.Errorf("multipart body: %w", err))
			}
			start, end, err := contentRange(part.Header.Get("Content-Range"))
			if err != nil {
				return &Error{Op: "read blob", Ref: what, Kind: KindTransient, Err: err}
			}
			if err := b.fillPart(part, start, end, ranges, filled); err != nil {
				return b.classify(what, err)
			}
		}
	}
	for i, r := range ranges {
		if filled[i] != int64(len(r.P)) {
			return &Error{Op: "read blob", Ref: what, Kind: KindTransient,
				Err: fmt.Errorf("multi-range answer holds %d of the %d bytes at %d", filled[i], len(r.P), r.Off)}
		}
	}
	return nil
}

// fillPart copies the part holding blob bytes start..end (inclusive) into
// the ranges it overlaps, counting what each got in filled.
func (b *Blob) fillPart(r io.Reader, start, end int64, ranges []Range, filled []int64) error {
	// The first range ending after start.
	i := sort.Search(len(ranges), func(i int) bool { return ranges[i].Off+int64(len(ranges[i].P)) > start })
	pos := start
	for ; i < len(ranges) && pos <= end; i++ {
		rg := ranges[i]
		if rg.Off > end {
			break
		}
		if rg.Off > pos { // a gap the server sent along: skip it
			n, err := io.CopyN(io.Discard, r, rg.Off-pos)
			b.bytes.Add(n)
			if err != nil {
				return fmt.Errorf("short part: %w", err)
			}
			pos = rg.Off
		}
		to := min(rg.Off+int64(len(rg.P)), end+1)
		n, err := io.ReadFull(r, rg.P[pos-rg.Off:to-rg.Off])
		b.bytes.Add(int64(n))
		filled[i] += int64(n)
		if err != nil {
			return fmt.Errorf("short part: got %d of %d bytes: %w", n, to-pos, err)
		}
		pos = to
	}
	// Whatever the part holds past the ranges.
	n, _ := io.Copy(io.Discard, r)
	b.bytes.Add(n)
	return nil
}
