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
// blob after a dropped connection.
const maxResumes = 5

// Open streams the whole blob from the start. If the connection drops or
// cannot be made, the stream resumes where it stopped with a Range request,
// a few times. The bytes are not verified here: hash them if they must
// match the digest. Reads after ctx is done fail.
func (b *Blob) Open(ctx context.Context) (io.ReadCloser, error) {
	s := &stream{b: b, ctx: ctx}
	if err := s.reconnect(); err != nil {
		return nil, err
	}
	return s, nil
}

// stream is an open whole-blob download.
type stream struct {
	b       *Blob
	ctx     context.Context
	body    io.ReadCloser // nil between connections
	off     int64         // bytes delivered so far
	resumes int
}

func (s *stream) connect() error {
	what := fmt.Sprintf("%s@%s", s.b.img.repo, s.b.digest)
	req, err := http.NewRequestWithContext(s.ctx, http.MethodGet, s.b.url, nil)
	if err != nil {
		return &Error{Op: "fetch blob", Ref: what, Err: err}
	}
	if s.off > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", s.off, s.b.size-1))
	}
	s.b.requests.Add(1)
	resp, err := s.b.img.client.Do(req)
	if err != nil {
		return classify("fetch blob", what, err)
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		// The whole blob; when resuming, skip what was already delivered.
		if _, err := io.CopyN(io.Discard, resp.Body, s.off); err != nil {
			resp.Body.Close()
			return &Error{Op: "fetch blob", Ref: what, Err: err}
		}
	case resp.StatusCode == http.StatusPartialContent && s.off > 0:
		start, err := contentRangeStart(resp.Header.Get("Content-Range"))
		if err != nil || start != s.off {
			resp.Body.Close()
			return &Error{Op: "fetch blob", Ref: what, Kind: KindBadResponse,
				Err: fmt.Errorf("registry sent Content-Range %q", resp.Header.Get("Content-Range"))}
		}
	default:
		resp.Body.Close()
		e := &Error{Op: "fetch blob", Ref: what, Kind: KindBadResponse, Err: fmt.Errorf("HTTP %s", resp.Status)}
		switch {
		case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
			e.Kind = KindUnauthorized
		case resp.StatusCode == http.StatusNotFound:
			e.Kind = KindNotFound
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			e.Kind = KindOther
		}
		return e
	}
	s.body = resp.Body
	return nil
}

func (s *stream) Read(p []byte) (int, error) {
	for {
		if s.off >= s.b.size {
			return 0, io.EOF
		}
		if err := s.reconnect(); err != nil {
			return 0, err
		}
		if rest := s.b.size - s.off; int64(len(p)) > rest {
			p = p[:rest]
		}
		n, err := s.body.Read(p)
		s.off += int64(n)
		s.b.bytes.Add(int64(n))
		if n > 0 || err == nil {
			return n, nil
		}
		// The body ended or broke before the blob's size.
		s.body.Close()
		s.body = nil
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		if err := s.backoff(err); err != nil {
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
	if s.ctx.Err() != nil {
		return s.ctx.Err()
	}
	if s.resumes >= maxResumes {
		return &Error{Op: "fetch blob", Ref: fmt.Sprintf("%s@%s", s.b.img.repo, s.b.digest),
			Err: fmt.Errorf("gave up at byte %d of %d after %d resumes: %w", s.off, s.b.size, s.resumes, cause)}
	}
	s.b.img.logger.Debug("resuming blob download", "blob", s.b.digest, "offset", s.off, "err", cause)
	select {
	case <-time.After(retryDelay(s.resumes)):
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
	s.resumes++
	return nil
}

func (s *stream) Close() error {
	if s.body != nil {
		err := s.body.Close()
		s.body = nil
		return err
	}
	return nil
}
