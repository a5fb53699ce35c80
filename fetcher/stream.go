package fetcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
)

// maxResumes bounds how often one Open stream re-requests the rest of the
// blob after a dropped connection or a failed request.
const maxResumes = 5

// Open streams the whole blob from the start. If the connection drops or
// cannot be made, the stream resumes where it stopped with a Range request,
// a few times (backoff as for ReadAt; a response that goes quiet for the
// stall timeout counts as dropped), and gives up when it has not moved for
// the fetch timeout. The bytes are not verified here: hash
// them if they must match the digest. Reads after ctx is done fail.
func (b *Blob) Open(ctx context.Context) (io.ReadCloser, error) {
	return b.OpenRange(ctx, 0, b.size)
}

// OpenRange streams blob bytes [off, off+n) with one Range request,
// resuming like Open. Unlike ReadAt, the bytes can be used as they arrive:
// a reader decodes the first chunks of a long range while the rest is on
// the wire.
func (b *Blob) OpenRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n < 0 || off+n > b.size {
		return nil, fmt.Errorf("range %d+%d outside the %d-byte blob %s", off, n, b.size, b.digest)
	}
	s := &stream{b: b, ctx: ctx, what: fmt.Sprintf("%s@%s", b.img.repo, b.digest), start: off, off: off, end: off + n, moved: time.Now()}
	if n == 0 {
		return s, nil
	}
	if err := s.reconnect(); err != nil {
		return nil, err
	}
	return s, nil
}

// stream is an open download of blob bytes [start, end).
type stream struct {
	b          *Blob
	ctx        context.Context
	what       string
	body       io.Reader // nil between connections
	done       func()    // releases the current response
	start, end int64
	off        int64     // next blob offset to deliver
	moved      time.Time // when off last moved (or the stream opened)
	resumes    int
}

func (s *stream) connect() error {
	rng := ""
	if s.off > 0 || s.end < s.b.size {
		rng = fmt.Sprintf("bytes=%d-%d", s.off, s.end-1)
	}
	resp, progress, done, err := s.b.open(s.ctx, rng)
	if err != nil {
		return s.b.classify(s.what, err)
	}
	body := &progressReader{resp.Body, progress}
	switch {
	case resp.StatusCode == http.StatusOK:
		// The whole blob; when resuming, skip what was already delivered.
		if _, err := io.CopyN(io.Discard, body, s.off); err != nil {
			done()
			return s.b.classify(s.what, fmt.Errorf("skipping to %d in a whole-blob answer: %w", s.off, err))
		}
	case resp.StatusCode == http.StatusPartialContent && rng != "":
		start, _, err := contentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != s.off {
			done()
			return &Error{Op: "fetch blob", Ref: s.what, Kind: KindTransient,
				Err: fmt.Errorf("registry sent Content-Range %q", resp.Header.Get("Content-Range"))}
		}
	default:
		done()
		return statusError(s.what, resp)
	}
	s.body, s.done = body, done
	return nil
}

func (s *stream) Read(p []byte) (int, error) {
	for {
		if s.off >= s.end {
			return 0, io.EOF
		}
		if err := s.reconnect(); err != nil {
			return 0, err
		}
		if rest := s.end - s.off; int64(len(p)) > rest {
			p = p[:rest]
		}
		n, err := s.body.Read(p)
		s.off += int64(n)
		if n > 0 {
			s.moved = time.Now()
		}
		s.b.bytes.Add(int64(n))
		if n > 0 || err == nil {
			return n, nil
		}
		// The body ended or broke before the blob's size.
		s.release()
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		if err := s.backoff(s.b.classify(s.what, err)); err != nil {
			return 0, err
		}
	}
}

// reconnect makes sure a response body is open at s.off, retrying
// transient failures.
func (s *stream) reconnect() error {
	for s.body == nil {
		err := s.connect()
		if err == nil {
			return nil
		}
		var fe *Error
		if errors.As(err, &fe) && !fe.Retryable() {
			return err
		}
		if err := s.backoff(err); err != nil {
			return err
		}
	}
	return nil
}

// backoff waits before the next resume, or says why not to.
func (s *stream) backoff(cause error) error {
	s.b.errors.Add(1)
	if s.ctx.Err() != nil {
		return s.ctx.Err()
	}
	if s.resumes >= maxResumes {
		return &Error{Op: "fetch blob", Ref: s.what, Kind: KindTransient,
			Err: fmt.Errorf("gave up after %d resumes, at byte %d of %d-%d: %w", s.resumes, s.off, s.start, s.end-1, cause)}
	}
	delay := backoff(s.resumes)
	var fe *Error
	if errors.As(cause, &fe) && fe.RetryAfter > delay {
		delay = fe.RetryAfter
	}
	if stuck := time.Since(s.moved); stuck+delay > s.b.img.fetchTimeout {
		return &Error{Op: "fetch blob", Ref: s.what, Kind: KindTransient,
			Err: fmt.Errorf("gave up after %d resumes, no progress for %s (fetch timeout %s), at byte %d of %d-%d: %w",
				s.resumes, stuck.Round(time.Millisecond), s.b.img.fetchTimeout, s.off, s.start, s.end-1, cause)}
	}
	s.b.img.logger.Debug("resuming blob download", "blob", s.b.digest, "offset", s.off, "in", delay.Round(time.Millisecond), "err", cause)
	s.b.retries.Add(1)
	t := time.NewTimer(delay)
	select {
	case <-t.C:
	case <-s.ctx.Done():
		t.Stop()
		return s.ctx.Err()
	}
	s.resumes++
	return nil
}

func (s *stream) release() {
	if s.done != nil {
		s.done()
	}
	s.body, s.done = nil, nil
}

func (s *stream) Close() error {
	s.release()
	return nil
}
