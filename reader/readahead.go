package reader

import "sort"

// Read-ahead: when a file is read sequentially, the chunks ahead of the
// reader are fetched in parallel requests of up to aheadRequest compressed
// bytes, up to aheadWindow file bytes ahead (at most three quarters of the
// cache's fresh tier, so read-ahead does not evict itself), with at most
// aheadInFlight compressed bytes and aheadParallel requests in flight per
// layer. The window is topped up once half a request's worth is free: with
// a window of 32 MiB topped up by whole requests, the link stood idle a
// fifth of a cold sequential read while the reader caught up (request
// timeline of the 256 MiB bench file); with 48 MiB topped up by halves,
// a tenth.
const (
	aheadRequest  = 16 << 20
	aheadWindow   = 48 << 20
	aheadInFlight = 64 << 20
	// Read-ahead requests in flight per layer. Few, so they finish in
	// order: many parallel requests share the link evenly and all finish
	// together, after which the link idles while new ones start.
	aheadParallel = 4
	// A read starting within aheadSlack of where the previous one ended
	// continues a sequential run (the kernel reorders its reads a little).
	aheadSlack = 512 << 10
	// A read up to aheadBehind before where the furthest one ended
	// continues it too: the kernel sends its read-ahead for a file as
	// several requests at once (FUSE async reads), served in any order.
	aheadBehind = 4 << 20
	// Reads in a row before read-ahead starts.
	aheadStreak = 2
	// Files whose read state is kept; past it the state is dropped.
	maxSeqFiles = 1024
	// Chunks ahead of a sequential reader that are in the disk store are
	// loaded into memory up to loadWindow file bytes ahead (at most a
	// quarter of the fresh tier), loadInFlight bytes at a time per layer.
	loadWindow   = 16 << 20
	loadInFlight = 16 << 20
)

// seqState is what is known about how one file is being read.
type seqState struct {
	next   int64 // end of the last read
	streak int   // sequential reads in a row
	ahead  int64 // file offset up to which read-ahead was started
	loaded int64 // file offset up to which store loads were started
}

// noteRead records a read of size bytes at off in n and, when the file is
// being read sequentially, starts fetching the chunks ahead.
func (l *Layer) noteRead(n *Node, off, size int64) {
	if len(n.chunks) < 2 {
		return
	}
	t := &l.fetches
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.seq == nil || len(t.seq) >= maxSeqFiles {
		t.seq = map[*Node]*seqState{}
	}
	s := t.seq[n]
	if s == nil {
		s = &seqState{}
		t.seq[n] = s
	}
	if (off == 0 && s.next == 0) || (off >= s.next-aheadBehind && off <= s.next+aheadSlack) {
		s.streak++
	} else {
		s.streak, s.ahead = 0, 0
	}
	s.next = max(s.next, off+size)
	if s.streak < aheadStreak {
		return
	}
	l.loadAheadLocked(n, s, off+size)
	window := min(int64(aheadWindow), l.cache.max*3/4)
	if window < aheadRequest {
		return
	}
	from := max(s.ahead, off+size)
	to := min(n.Size, off+window)
	if from >= to || (to-from < aheadRequest/2 && to < n.Size) {
		return // top up in requests of half a request's bytes or more
	}
	for from < to && t.ahead.Load() < aheadInFlight && t.aheadPlans.Load() < aheadParallel {
		i := sort.Search(len(n.chunks), func(i int) bool { return n.chunks[i].off+n.chunks[i].size > from })
		if i >= len(n.chunks) {
			break
		}
		p := l.planLocked(n, i, to, aheadRequest, true)
		if len(p.chunks) == 0 {
			from = to // nothing left to fetch up to the window's end
			break
		}
		// On past the last chunk of this file the plan holds.
		for x, c := range p.chunks {
			if p.owners[x] == n {
				from = max(from, c.off+c.size)
			}
		}
		t.ahead.Add(p.bytes)
		t.aheadPlans.Add(1)
		go func() {
			l.run(p)
			t.ahead.Add(-p.bytes)
			t.aheadPlans.Add(-1)
		}()
	}
	s.ahead = max(s.ahead, from)
}

// loadAheadLocked starts loading the chunks of n from the store that lie
// within the load window after off and are neither in memory nor being
// fetched, so that a sequential reader of a file the disk cache holds finds
// its next chunks in memory instead of waiting for the disk chunk by chunk.
// The caller holds l.fetches.mu.
func (l *Layer) loadAheadLocked(n *Node, s *seqState, off int64) {
	if l.cache.store == nil {
		return
	}
	t := &l.fetches
	to := min(n.Size, off+min(loadWindow, l.cache.max/4))
	from := max(s.loaded, off)
	i := sort.Search(len(n.chunks), func(i int) bool { return n.chunks[i].off+n.chunks[i].size > from })
	for ; i < len(n.chunks) && n.chunks[i].off < to && t.loading.Load() < loadInFlight; i++ {
		c := &n.chunks[i]
		from = c.off + c.size
		key := l.key(c)
		if t.inflight[key] != nil || l.cache.inMemory(key) {
			continue
		}
		t.loading.Add(c.size)
		go func() {
			defer t.loading.Add(-c.size)
			l.cache.getStore(key)
		}()
	}
	s.loaded = max(s.loaded, from)
}
