package reader

import (
	"cmp"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
)

// Stats is what a layer has done so far. Byte counts are compressed blob
// bytes.
type Stats struct {
	// TotalBytes is the compressed size of all file data (every chunk).
	TotalBytes int64
	// DataBytes is the decompressed size of all file data.
	DataBytes int64
	// FetchedBytes is how much of TotalBytes has been fetched, verified and
	// kept at least once; Complete is set when that is all of it.
	FetchedBytes int64
	Chunks       int
	ChunksKept   int
	Complete     bool

	// MemoryHits and MemoryMisses count chunk lookups in the memory cache.
	MemoryHits, MemoryMisses int64
	// DiskHits and DiskMisses count lookups in the disk cache, made after
	// a memory miss when there is one.
	DiskHits, DiskMisses int64
	// Requests and Bytes count the data reads the layer made (on-demand,
	// prefetch and background, not footer and TOC) and their sizes.
	Requests, Bytes int64
	// FilesSaved counts files SaveFile stored whole; SavedOpens counts
	// the opens SavedFile served from such a copy.
	FilesSaved, SavedOpens int64

	// PrefetchBytes is the prioritized region's size, 0 without a landmark.
	PrefetchBytes int64
	// Prefetch is "none", "running", "done" or "failed".
	Prefetch string
	// Background is "off", "waiting", "running", "paused", "done" or
	// "failed".
	Background string
}

// unit is one chunk of the layer, for accounting: chunks shared by
// hardlinked names appear once.
type unit struct {
	c     *chunk
	n     *Node // the file c belongs to
	bytes int64 // compressed bytes it accounts for: 0 for a second chunk of one gzip member
	kept  bool
}

// accounting tracks which chunks have been kept and counts lookups and
// requests.
type accounting struct {
	once  sync.Once
	units []unit // sorted by blob offset, then inner offset; c and n fixed after once
	total int64
	data  int64 // decompressed bytes of all units

	mu      sync.Mutex // guards kept, fetched and the units' kept flags
	kept    int
	fetched int64

	memHits, memMisses   atomic.Int64
	diskHits, diskMisses atomic.Int64
	requests, bytes      atomic.Int64
	filesSaved           atomic.Int64 // whole files stored by SaveFile
	savedOpens           atomic.Int64 // opens served a saved file by SavedFile

	prefetch   atomic.Value // string
	background atomic.Value // string
}

// index lists the layer's chunks once, on first use.
func (l *Layer) index() []unit {
	a := &l.acct
	a.once.Do(func() {
		seen := map[*Node]bool{}
		var walk func(n *Node)
		walk = func(n *Node) {
			if seen[n] {
				return
			}
			seen[n] = true
			for i := range n.chunks {
				a.units = append(a.units, unit{c: &n.chunks[i], n: n})
			}
			for _, d := range n.children {
				walk(d.Node)
			}
		}
		walk(l.root)
		slices.SortFunc(a.units, func(x, y unit) int {
			return cmp.Or(cmp.Compare(x.c.blobOff, y.c.blobOff), cmp.Compare(x.c.inner, y.c.inner))
		})
		// Hardlinked names share a node, but two entries may still point at
		// the same bytes: keep one unit per (offset, inner offset).
		a.units = slices.CompactFunc(a.units, func(x, y unit) bool {
			return x.c.blobOff == y.c.blobOff && x.c.inner == y.c.inner
		})
		for i := range a.units {
			u := &a.units[i]
			a.data += u.c.size
			if i == 0 || a.units[i-1].c.blobOff != u.c.blobOff {
				u.bytes = u.c.blobEnd - u.c.blobOff
				a.total += u.bytes
			}
		}
	})
	return a.units
}

// find returns the index of c's unit, or -1.
func (l *Layer) find(c *chunk) int {
	units := l.index()
	// Read only the fixed field c: kept changes under a.mu while other
	// fetches look their chunks up (a copy of the whole unit would race).
	i := sort.Search(len(units), func(k int) bool {
		u := units[k].c
		return cmp.Or(cmp.Compare(u.blobOff, c.blobOff), cmp.Compare(u.inner, c.inner)) >= 0
	})
	if i == len(units) || units[i].c.blobOff != c.blobOff || units[i].c.inner != c.inner {
		return -1
	}
	return i
}

// cached reports whether chunk c is in memory or in the store, marking it
// kept if so, without counting a lookup.
func (l *Layer) cached(c *chunk) bool {
	key := l.key(c)
	if _, ok := l.cache.getMemory(key); !ok {
		if l.cache.store == nil {
			return false
		}
		if b, ok := l.cache.store.Get(storeKey(key)); !ok || int64(len(b)) != c.size {
			return false
		}
	}
	l.mark(c)
	return true
}

// keep puts a fetched, verified chunk where later reads find it and marks
// it kept. Every fetch path (on-demand, prefetch, background) ends here.
func (l *Layer) keep(c *chunk, data []byte) {
	l.cache.set(l.key(c), data)
	l.mark(c)
}

// mark notes that chunk c is kept.
func (l *Layer) mark(c *chunk) {
	i := l.find(c)
	if i < 0 {
		return
	}
	a := &l.acct
	a.mu.Lock()
	if u := &a.units[i]; !u.kept {
		u.kept = true
		a.kept++
		a.fetched += u.bytes
	}
	a.mu.Unlock()
}

// isKept reports whether unit i was kept once.
func (l *Layer) isKept(i int) bool {
	a := &l.acct
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.units[i].kept
}

// counted notes one data request of n bytes.
func (l *Layer) counted(n int) {
	l.acct.requests.Add(1)
	l.acct.bytes.Add(int64(n))
}

// Stats returns the layer's counters.
func (l *Layer) Stats() Stats {
	units := l.index()
	a := &l.acct
	s := Stats{
		TotalBytes:    a.total,
		DataBytes:     a.data,
		Chunks:        len(units),
		MemoryHits:    a.memHits.Load(),
		MemoryMisses:  a.memMisses.Load(),
		DiskHits:      a.diskHits.Load(),
		DiskMisses:    a.diskMisses.Load(),
		Requests:      a.requests.Load(),
		Bytes:         a.bytes.Load(),
		FilesSaved:    a.filesSaved.Load(),
		SavedOpens:    a.savedOpens.Load(),
		PrefetchBytes: l.prefetch,
		Prefetch:      "none",
		Background:    "off",
	}
	if v, ok := a.prefetch.Load().(string); ok {
		s.Prefetch = v
	}
	if v, ok := a.background.Load().(string); ok {
		s.Background = v
	}
	a.mu.Lock()
	s.ChunksKept = a.kept
	s.FetchedBytes = a.fetched
	a.mu.Unlock()
	s.Complete = s.ChunksKept == s.Chunks
	return s
}
