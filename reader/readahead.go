package reader

import "sort"

// Read-ahead: when a file is read sequentially, the chunks ahead of the
// reader are fetched in parallel requests of aheadRequest compressed bytes,
// up to aheadWindow file bytes ahead (at most half the cache's fresh tier,
// so read-ahead does not evict itself), with at most aheadInFlight
// compressed bytes and aheadParallel requests in flight per layer.
const (
	aheadRequest  = 2 << 20
	aheadWindow   = 32 << 20
	aheadInFlight = 64 << 20
	// Read-ahead requests in flight per layer. Few, so they finish in
	// order: many parallel requests share the link evenly and all finish
	// together, after which the link idles while new ones start.
	aheadParallel = 4
	// A read starting within aheadSlack of where the previous one ended
	// continues a sequential run (the kernel reorders its reads a little).
	aheadSlack = 512 << 10
	// Reads in a row before read-ahead starts.
	aheadStreak = 2
	// Files whose read state is kept; past it the state is dropped.
	maxSeqFiles = 1024
)

// seqState is what is known about how one file is being read.
type seqState struct {
	next   int64 // end of the last read
	streak int   // sequential reads in a row
	ahead  int64 // file offset up to which read-ahead was started
}

// noteRead records a read of size bytes at off in n and, when the file is
// being read sequentially, starts fetching the chunks ahead.
func (l *Layer) noteRead(n *Node, off, size int64) {
	window := min(int64(aheadWindow), l.cache.max/2)
	if window < aheadRequest || len(n.chunks) < 2 {
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
	if (off == 0 && s.next == 0) || (off >= s.next-aheadSlack && off <= s.next+aheadSlack) {
		s.streak++
	} else {
		s.streak, s.ahead = 0, 0
	}
	s.next = max(s.next, off+size)
	if s.streak < aheadStreak {
		return
	}
	from := max(s.ahead, off+size)
	to := min(n.Size, off+window)
	if from >= to || (to-from < aheadRequest && to < n.Size) {
		return // top up in whole requests
	}
	for from < to && t.ahead.Load() < aheadInFlight && t.aheadPlans.Load() < aheadParallel {
		i := sort.Search(len(n.chunks), func(i int) bool { return n.chunks[i].off+n.chunks[i].size > from })
		if i >= len(n.chunks) {
			break
		}
		p := l.planLocked(n, i, aheadRequest, true)
		if len(p.chunks) == 0 {
			break // nothing left to fetch in this file
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
