package reader

import (
	"context"
	"fmt"
)

// Prefetch fetches the layer's prioritized region, everything before its
// ".prefetch.landmark", in one request, and keeps every chunk in it that
// verifies, as an on-demand read would. A layer without the landmark (or
// with ".no.prefetch.landmark") has nothing to prefetch. A chunk that fails
// verification is skipped: its on-demand read reports it.
func (l *Layer) Prefetch(ctx context.Context) error {
	if l.prefetch <= 0 {
		return nil
	}
	units := l.index()
	var todo []int
	start, end := int64(-1), int64(0)
	for i, u := range units {
		if u.c.blobOff >= l.prefetch {
			break
		}
		if start < 0 {
			start = u.c.blobOff
		}
		end = max(end, min(u.c.blobEnd, l.prefetch))
		todo = append(todo, i)
	}
	if len(todo) == 0 {
		return nil
	}
	l.acct.prefetch.Store("running")
	comp := make([]byte, end-start)
	if err := readFull(ctx, l.blob, comp, start); err != nil {
		l.acct.prefetch.Store("failed")
		return fmt.Errorf("prefetch %s: blob bytes %d-%d: %w", l.name, start, end-1, err)
	}
	l.counted(len(comp))
	bad := 0
	for _, i := range todo {
		c := units[i].c
		if l.isKept(i) || c.blobEnd > end {
			continue
		}
		data, err := decode(c, comp[c.blobOff-start:c.blobEnd-start])
		if err != nil {
			bad++
			l.logger.Warn("prefetch: bad chunk", "layer", l.name, "offset", c.blobOff, "err", err)
			continue
		}
		l.keep(c, data)
	}
	l.acct.prefetch.Store("done")
	if bad > 0 {
		return fmt.Errorf("prefetch %s: %d chunks did not verify", l.name, bad)
	}
	return nil
}
