package fetcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Blob reads one layer blob of an image with HTTP range requests. It is safe
// for concurrent use.
type Blob struct {
	img    *Image
	digest v1.Hash
	size   int64
	url    string

	requests atomic.Int64
	bytes    atomic.Int64
}

// Blob returns a reader over layer l's blob. No request is made until the
// first read.
func (im *Image) Blob(l Layer) *Blob {
	return &Blob{
		img:    im,
		digest: l.Digest,
		size:   l.Size,
		url:    fmt.Sprintf("%s://%s/v2/%s/blobs/%s", im.scheme, im.repo.RegistryStr(), im.repo.RepositoryStr(), l.Digest),
	}
}

// Size is the blob's size in bytes, as the manifest says.
func (b *Blob) Size() int64 { return b.size }

// Digest is the blob's digest.
func (b *Blob) Digest() v1.Hash { return b.digest }

// Stats returns the number of requests made and body bytes received.
func (b *Blob) Stats() (requests, bytes int64) { return b.requests.Load(), b.bytes.Load() }

// ReadAt reads len(p) bytes at off with one Range request, retrying transient
// failures a few times. It returns io.EOF only for reads past the end.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	return b.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt bounded by ctx.
func (b *Blob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", b.digest, off)
	}
	if off >= b.size {
		return 0, io.EOF
	}
	want := p
	if rest := b.size - off; int64(len(want)) > rest {
		want = want[:rest]
	}
	if len(want) == 0 {
		return 0, nil
	}
	var err error
	for attempt := 0; ; attempt++ {
		err = b.get(ctx, want, off)
		if err == nil {
			break
		}
		var fe *Error
		if attempt >= 3 || (errors.As(err, &fe) && !fe.Retryable()) || ctx.Err() != nil {
			return 0, err
		}
		b.img.logger.Debug("retrying blob read", "blob", b.digest, "offset", off, "len", len(want), "err", err)
		select {
		case <-time.After(retryDelay(attempt)):
		case <-ctx.Done():
			return 0, err
		}
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

func (b *Blob) get(ctx context.Context, p []byte, off int64) error {
	end := off + int64(len(p)) - 1
	what := fmt.Sprintf("%s@%s bytes %d-%d", b.img.repo, b.digest, off, end)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.url, nil)
	if err != nil {
		return &Error{Op: "read blob", Ref: what, Err: err}
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, end))
	b.requests.Add(1)
	resp, err := b.img.client.Do(req)
	if err != nil {
		return classify("read blob", what, err)
	}
	defer resp.Body.Close()

	body := io.Reader(resp.Body)
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, err := contentRangeStart(resp.Header.Get("Content-Range"))
		if err != nil || start != off {
			return &Error{Op: "read blob", Ref: what, Kind: KindBadResponse,
				Err: fmt.Errorf("registry sent Content-Range %q", resp.Header.Get("Content-Range"))}
		}
	case http.StatusOK:
		// The registry ignored Range and sent the whole blob: skip to off.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return &Error{Op: "read blob", Ref: what, Err: err}
		}
	default:
		err := fmt.Errorf("HTTP %s", resp.Status)
		e := &Error{Op: "read blob", Ref: what, Kind: KindBadResponse, Err: err}
		switch {
		case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
			e.Kind = KindUnauthorized
		case resp.StatusCode == http.StatusNotFound:
			e.Kind = KindNotFound
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			e.Kind = KindOther // retryable
		}
		return e
	}
	n, err := io.ReadFull(body, p)
	b.bytes.Add(int64(n))
	if err != nil {
		return &Error{Op: "read blob", Ref: what, Err: fmt.Errorf("short body: got %d of %d bytes: %w", n, len(p), err)}
	}
	return nil
}

// contentRangeStart parses the first byte position of "bytes START-END/SIZE".
func contentRangeStart(h string) (int64, error) {
	rest, ok := strings.CutPrefix(h, "bytes ")
	if !ok {
		return 0, fmt.Errorf("bad Content-Range %q", h)
	}
	startStr, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, fmt.Errorf("bad Content-Range %q", h)
	}
	return strconv.ParseInt(startStr, 10, 64)
}

func hostArch() string { return runtime.GOARCH }

func hostVariant() string {
	if runtime.GOARCH == "arm64" {
		return "v8"
	}
	return ""
}
