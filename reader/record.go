package reader

import "sync"

// recorder keeps the paths of files read, in order of first read.
type recorder struct {
	mu    sync.Mutex // guards seen and paths
	seen  map[*Node]bool
	paths []string
}

// Record starts noting which files are read, for Recorded. Recording
// costs a map lookup per read; it is off until Record is called.
func (l *Layer) Record() {
	l.rec.CompareAndSwap(nil, &recorder{seen: map[*Node]bool{}})
}

// Recorded returns the paths of the regular files read since Record, in
// order of first read. Prefetch and background fetching do not count.
func (l *Layer) Recorded() []string {
	r := l.rec.Load()
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.paths...)
}

// note records a read of n when recording.
func (l *Layer) note(n *Node) {
	r := l.rec.Load()
	if r == nil {
		return
	}
	r.mu.Lock()
	if !r.seen[n] {
		r.seen[n] = true
		r.paths = append(r.paths, n.Path())
	}
	r.mu.Unlock()
}
