// Package lru is a bounded on-disk store of byte entries, shared safely by
// several processes, that evicts the least recently used entries first.
//
// Keys are "GROUP/NAME" (for stargz-mount: a layer digest and a chunk
// position). Each entry is one file DIR/GROUP/NAME holding a 16-byte header
// (magic, CRC-32C of the data, length) and the data. Writes go to a temp
// file that is then hard-linked into place, so readers never see a partial
// entry; an entry whose header or checksum does not match on read is
// removed and reported as a miss. CRC-32C detects disk corruption and torn
// writes; it is no defence against someone who can write the cache dir
// (callers verify content digests before they Put).
//
// The bytes stored (rounded up to 4 KiB blocks, as the file system counts
// them) are counted in DIR/.usage, shared by all processes under an flock.
// Space is reserved there before an entry is written and given back after
// one is removed, so the count never falls below what is on disk and the
// bound holds at all times. A process that opens the store while no other
// process has it open recounts from disk and clears stale temp files, which
// repairs the count after a crash. Eviction removes the entries with the
// oldest modification time; Get touches the entries it reads. Bytes kept
// outside the store can share its bound (WithExternalUsage).
//
// File entries (PutFile, OpenFile) hold the data alone, so that the kernel
// can read them directly (FUSE passthrough); their length and a CRC-32C of
// each block are in the xattr user.stargz-mount.crc32c. OpenFile checks
// them all the first time it opens an entry after a boot or after the
// entry's modification time changed, and trusts the page cache and the
// disk in between (see file.go).
//
// Hold marks a group as needed by a live user (a shared flock on
// DIR/.locks/GROUP); Prune and RemoveGroup leave held groups alone. Normal
// eviction does not: the bound comes first, and an evicted entry is only a
// cache miss.
package lru

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	headerSize = 16
	magic      = "SGZ1"
	blockSize  = 4096
	// lowWater is the share of the bound eviction frees down to, so that
	// it scans the store once per tenth of the bound written, not per Put.
	lowWater = 0.9
	// touchAfter is how stale an entry's mtime must be before Get
	// refreshes it; it spares a syscall per read of a hot entry.
	touchAfter = time.Second
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrBusy is returned by RemoveGroup for a group a live user holds.
var ErrBusy = errors.New("in use by a live mount")

// ErrTooLarge is returned by Put for an entry larger than the bound.
var ErrTooLarge = errors.New("entry larger than the store's bound")

// ErrFull is returned by Put for an entry that does not fit even with
// every entry evicted: the bytes counted outside the store (see
// WithExternalUsage) or reserved by writes in flight leave no room.
var ErrFull = errors.New("no room within the store's bound")

// Option configures Open.
type Option func(*Store)

// WithLogger sets the logger for failures that only cost a cache miss. The
// default is slog.Default().
func WithLogger(l *slog.Logger) Option { return func(s *Store) { s.logger = l } }

// WithExternalUsage counts bytes kept outside the store against its bound
// (stargz-mount's unpacked layers, which share --cache-max-disk with the
// chunks): every write evicts until the store's own usage plus what
// external returns fits within the bound. external is called under the
// store's lock at every write, so it must be cheap and must not use the
// store. The default is none: the store alone is bounded.
func WithExternalUsage(external func() int64) Option {
	return func(s *Store) { s.external = external }
}

// Store is an open on-disk store. It is safe for concurrent use, also by
// several processes opening the same directory.
type Store struct {
	dir      string
	max      int64
	logger   *slog.Logger
	external func() int64 // bytes outside the store counted against max; nil: none
	users    *os.File     // DIR/.users: held shared while open; exclusive means alone

	mu    sync.Mutex // guards the count file between goroutines (flock is per file, not per goroutine)
	usage *os.File   // DIR/.usage, flocked for every update

	boot string // this boot's ID (file.go); empty if unknown
}

// Group describes one group of entries.
type Group struct {
	Name     string    `json:"name"`
	Entries  int       `json:"entries"`
	Bytes    int64     `json:"bytes"` // on disk, in 4 KiB blocks
	LastUsed time.Time `json:"lastUsed"`
	InUse    bool      `json:"inUse"` // held by a live user
}

// Open opens (creating if needed) the store in dir, bounded to max bytes.
func Open(dir string, max int64, opts ...Option) (*Store, error) {
	s := &Store{dir: dir, max: max, logger: slog.Default(), boot: bootID()}
	for _, o := range opts {
		o(s)
	}
	for _, d := range []string{dir, s.tmpDir(), filepath.Join(dir, ".locks")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("cache dir: %w", err)
		}
	}
	var err error
	if s.users, err = os.OpenFile(filepath.Join(dir, ".users"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("cache dir: %w", err)
	}
	if s.usage, err = os.OpenFile(filepath.Join(dir, ".usage"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		s.users.Close()
		return nil, fmt.Errorf("cache dir: %w", err)
	}
	if err := s.join(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// join registers this process as a user; the first one recounts.
func (s *Store) join() error {
	if err := unix.Flock(int(s.users.Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
		// Alone: whatever a crashed process left is ours to clean up.
		if err := s.recount(); err != nil {
			return err
		}
	} else if !errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("lock cache dir: %w", err)
	}
	if err := unix.Flock(int(s.users.Fd()), unix.LOCK_SH); err != nil {
		return fmt.Errorf("lock cache dir: %w", err)
	}
	return nil
}

// recount clears temp files and sets the count to what is on disk.
func (s *Store) recount() error {
	ents, _ := os.ReadDir(s.tmpDir())
	for _, e := range ents {
		os.Remove(filepath.Join(s.tmpDir(), e.Name()))
	}
	return s.update(func(int64) (int64, error) {
		var total int64
		err := s.walk(func(e entryInfo) error { total += e.cost; return nil })
		return total, err
	})
}

// Close releases the store's files and locks.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	if s.usage != nil {
		errs = append(errs, s.usage.Close())
		s.usage = nil
	}
	if s.users != nil {
		errs = append(errs, s.users.Close())
		s.users = nil
	}
	return errors.Join(errs...)
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// Max is the store's bound in bytes.
func (s *Store) Max() int64 { return s.max }

func (s *Store) tmpDir() string { return filepath.Join(s.dir, ".tmp") }

// cost is what an entry of n data bytes occupies on disk.
func cost(n int) int64 { return diskCost(int64(n) + headerSize) }

// diskCost is what a file of size bytes occupies on disk.
func diskCost(size int64) int64 { return (max(size, 0) + blockSize - 1) / blockSize * blockSize }

func validPart(p string) bool {
	if p == "" || len(p) > 200 || p[0] == '.' {
		return false
	}
	for _, r := range p {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', strings.ContainsRune(":._+=@-", r):
		default:
			return false
		}
	}
	return true
}

// path maps a key to its file.
func (s *Store) path(key string) (string, error) {
	g, n, ok := strings.Cut(key, "/")
	if !ok || !validPart(g) || !validPart(n) {
		return "", fmt.Errorf("cache key %q: want GROUP/NAME of letters, digits and %q", key, ":._+=@-")
	}
	return filepath.Join(s.dir, g, n), nil
}

// Get returns the data stored under key. A missing, unreadable or corrupt
// entry is a miss; a corrupt one is removed.
func (s *Store) Get(key string) ([]byte, bool) {
	p, err := s.path(key)
	if err != nil {
		return nil, false
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() < headerSize {
		s.drop(p, key, "short entry")
		return nil, false
	}
	buf := make([]byte, fi.Size())
	if _, err := io.ReadFull(f, buf); err != nil {
		s.logger.Debug("cache read failed", "key", key, "err", err)
		return nil, false
	}
	data, ok := decode(buf)
	if !ok {
		s.drop(p, key, "checksum mismatch")
		return nil, false
	}
	touch(p, fi)
	return data, true
}

// touch marks the entry at p, last modified as fi says, as just used,
// unless it was within touchAfter, and reports whether it did.
func touch(p string, fi os.FileInfo) bool {
	if time.Since(fi.ModTime()) <= touchAfter {
		return false
	}
	now := time.Now()
	os.Chtimes(p, now, now)
	return true
}

func decode(buf []byte) ([]byte, bool) {
	if len(buf) < headerSize || string(buf[:4]) != magic {
		return nil, false
	}
	sum := binary.LittleEndian.Uint32(buf[4:8])
	n := binary.LittleEndian.Uint64(buf[8:16])
	data := buf[headerSize:]
	if uint64(len(data)) != n || crc32.Checksum(data, castagnoli) != sum {
		return nil, false
	}
	return data, true
}

func (s *Store) drop(p, key, why string) {
	s.logger.Warn("dropping corrupt cache entry", "key", key, "why", why)
	s.removeFile(p)
}

// Has reports whether key has an entry, without reading or checking it.
func (s *Store) Has(key string) bool {
	p, err := s.path(key)
	if err != nil {
		return false
	}
	_, err = os.Lstat(p)
	return err == nil
}

// Put stores b under key unless an entry is there already, evicting the
// least recently used entries to stay within the bound.
func (s *Store) Put(key string, b []byte) error {
	return s.put(key, int64(len(b))+headerSize, func(f *os.File, p string) error { return s.write(f, p, b) })
}

// put adds an entry of size bytes on disk under key, written to its
// reserved temp file f and linked into place at p by write, unless an
// entry is there already.
func (s *Store) put(key string, size int64, write func(f *os.File, p string) error) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(p); err == nil {
		return nil // content-addressed: what is there is the same
	}
	c := diskCost(size)
	if c > s.max {
		return fmt.Errorf("put %s (an entry of %d bytes): %w", key, size, ErrTooLarge)
	}
	f, err := s.reserve(c, size)
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := write(f, p); err != nil {
		s.release(c)
		if errors.Is(err, fs.ErrExist) {
			return nil // another writer won
		}
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// write fills the reserved temp file f and links it into place at p.
func (s *Store) write(f *os.File, p string, b []byte) error {
	var h [headerSize]byte
	copy(h[:], magic)
	binary.LittleEndian.PutUint32(h[4:8], crc32.Checksum(b, castagnoli))
	binary.LittleEndian.PutUint64(h[8:16], uint64(len(b)))
	_, err := f.Write(h[:])
	if err == nil {
		_, err = f.Write(b)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return s.link(f.Name(), p)
}

// link puts the written temp file tmp into place at p.
func (s *Store) link(tmp, p string) error {
	// Link, unlike rename, never replaces: of two writers of one key
	// exactly one adds the entry, and only its reservation stays.
	for attempt := 0; ; attempt++ {
		err := os.Link(tmp, p)
		if !errors.Is(err, fs.ErrNotExist) || attempt > 0 {
			return err
		}
		// The group's directory is new, or a prune just removed it.
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return err
		}
	}
}

// Remove deletes the entry under key, if any.
func (s *Store) Remove(key string) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	return s.removeFile(p)
}

// removeFile unlinks an entry and gives its space back; of several
// processes removing one file only the one whose unlink succeeds does.
func (s *Store) removeFile(p string) error {
	fi, err := os.Lstat(p)
	if err != nil {
		return nil
	}
	return s.removeCounted(p, diskCost(fi.Size()))
}

// removeCounted unlinks an entry counted as c bytes.
func (s *Store) removeCounted(p string, c int64) error {
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	s.release(c)
	return nil
}

// Usage returns the bytes the store counts as used.
func (s *Store) Usage() (int64, error) {
	var n int64
	err := s.update(func(used int64) (int64, error) { n = used; return used, nil })
	return n, err
}

// reserve counts c more bytes, evicting first if they (with the external
// usage) would not fit, and creates the temp file for them with its final
// size, so that eviction in any process sees the reservation on disk.
func (s *Store) reserve(c, size int64) (*os.File, error) {
	var f *os.File
	err := s.update(func(used int64) (int64, error) {
		var ext int64
		if s.external != nil {
			ext = max(s.external(), 0)
		}
		if used+ext+c > s.max {
			target := int64(float64(s.max)*lowWater) - ext - c
			var err error
			if used, err = s.evict(used, max(target, 0), nil); err != nil {
				return used, err
			}
			if used+ext+c > s.max {
				return used, fmt.Errorf("%d bytes needed, %d used by the store and %d outside it, bound %d: %w", c, used, ext, s.max, ErrFull)
			}
		}
		var err error
		if f, err = os.CreateTemp(s.tmpDir(), "put-"); err != nil {
			return used, err
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			os.Remove(f.Name())
			return used, err
		}
		return used + c, nil
	})
	return f, err
}

func (s *Store) release(c int64) {
	if err := s.update(func(used int64) (int64, error) { return max(used-c, 0), nil }); err != nil {
		s.logger.Warn("cache usage count", "err", err)
	}
}

// update runs f on the shared count under the lock and stores its result.
func (s *Store) update(f func(used int64) (int64, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.usage == nil {
		return errors.New("cache store closed")
	}
	fd := int(s.usage.Fd())
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock cache usage: %w", err)
	}
	defer unix.Flock(fd, unix.LOCK_UN)
	var buf [32]byte
	n, _ := s.usage.ReadAt(buf[:], 0)
	used, err := strconv.ParseInt(strings.TrimSpace(string(buf[:n])), 10, 64)
	if err != nil || used < 0 {
		// Missing or mangled: count what is there.
		used = 0
		if werr := s.walk(func(e entryInfo) error { used += e.cost; return nil }); werr != nil {
			return werr
		}
	}
	next, ferr := f(used)
	if next != used || err != nil {
		out := strconv.AppendInt(nil, next, 10)
		out = append(out, '\n')
		if _, werr := s.usage.WriteAt(out, 0); werr != nil {
			return fmt.Errorf("write cache usage: %w", werr)
		}
		s.usage.Truncate(int64(len(out)))
	}
	return ferr
}

type entryInfo struct {
	path  string
	group string
	mtime time.Time
	cost  int64
}

// walk calls f for every entry.
func (s *Store) walk(f func(entryInfo) error) error {
	groups, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("scan cache: %w", err)
	}
	for _, g := range groups {
		if !g.IsDir() || !validPart(g.Name()) {
			continue
		}
		gdir := filepath.Join(s.dir, g.Name())
		ents, err := os.ReadDir(gdir)
		if err != nil {
			continue // removed meanwhile
		}
		for _, e := range ents {
			if !e.Type().IsRegular() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				continue
			}
			ei := entryInfo{path: filepath.Join(gdir, e.Name()), group: g.Name(), mtime: fi.ModTime(),
				cost: diskCost(fi.Size())}
			if err := f(ei); err != nil {
				return err
			}
		}
	}
	return nil
}

// evict removes the least recently used entries (of groups skip does not
// reject) until used is at most target, and returns the new count. Called
// with the count locked.
func (s *Store) evict(used, target int64, skip func(group string) bool) (int64, error) {
	// Space reserved for writes in progress is on disk as temp files of
	// their final size. List them before the entries: a write that
	// finishes meanwhile is then counted twice, never missed.
	var inFlight int64
	tmps, _ := os.ReadDir(s.tmpDir())
	for _, t := range tmps {
		if fi, err := t.Info(); err == nil {
			inFlight += diskCost(fi.Size())
		}
	}
	var all []entryInfo
	var onDisk int64
	if err := s.walk(func(e entryInfo) error {
		onDisk += e.cost
		if skip == nil || !skip(e.group) {
			all = append(all, e)
		}
		return nil
	}); err != nil {
		return used, err
	}
	// A count above what is on disk (a crash, files removed by hand) would
	// evict everything and still not fit: trust the disk then.
	used = min(used, onDisk+inFlight)
	sort.Slice(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	for _, e := range all {
		if used <= target {
			break
		}
		if err := os.Remove(e.path); err == nil {
			used -= e.cost
		}
	}
	return max(used, 0), nil
}

// Hold marks group as needed by a live user until release is called (or
// the process exits). Prune and RemoveGroup skip held groups; Hold waits
// while one of them is removing the group.
func (s *Store) Hold(group string) (release func() error, err error) {
	f, err := s.lockFile(group)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
		f.Close()
		return nil, fmt.Errorf("hold %s: %w", group, err)
	}
	return f.Close, nil
}

func (s *Store) lockFile(group string) (*os.File, error) {
	if !validPart(group) {
		return nil, fmt.Errorf("cache group %q: not a valid name", group)
	}
	f, err := os.OpenFile(filepath.Join(s.dir, ".locks", group), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", group, err)
	}
	return f, nil
}

// tryLock takes group's lock exclusively, or reports false if a live user
// holds it.
func (s *Store) tryLock(group string) (*os.File, bool, error) {
	f, err := s.lockFile(group)
	if err != nil {
		return nil, false, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("lock %s: %w", group, err)
	}
	return f, true, nil
}

// Groups lists the groups with their sizes, oldest use first.
func (s *Store) Groups() ([]Group, error) {
	byName := map[string]*Group{}
	err := s.walk(func(e entryInfo) error {
		g := byName[e.group]
		if g == nil {
			g = &Group{Name: e.group}
			byName[e.group] = g
		}
		g.Entries++
		g.Bytes += e.cost
		if e.mtime.After(g.LastUsed) {
			g.LastUsed = e.mtime
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]Group, 0, len(byName))
	for _, g := range byName {
		if f, ok, err := s.tryLock(g.Name); err == nil {
			g.InUse = !ok
			if ok {
				f.Close()
			}
		}
		out = append(out, *g)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LastUsed.Before(out[j].LastUsed) })
	return out, nil
}

// RemoveGroup removes every entry of group, or returns ErrBusy if a live
// user holds it. It returns the bytes freed.
func (s *Store) RemoveGroup(group string) (int64, error) {
	f, ok, err := s.tryLock(group)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("remove %s: %w", group, ErrBusy)
	}
	defer f.Close()
	gdir := filepath.Join(s.dir, group)
	ents, err := os.ReadDir(gdir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, err
	}
	before, _ := s.Usage()
	for _, e := range ents {
		s.removeFile(filepath.Join(gdir, e.Name()))
	}
	os.Remove(gdir)
	after, _ := s.Usage()
	return max(before-after, 0), nil
}

// Prune evicts least recently used entries of groups no live user holds
// until the store uses at most max bytes, and returns the bytes freed.
func (s *Store) Prune(max int64) (int64, error) {
	held := map[string]bool{}
	var locks []*os.File
	defer func() {
		for _, f := range locks {
			f.Close()
		}
	}()
	groups, err := os.ReadDir(s.dir)
	if err != nil {
		return 0, err
	}
	for _, g := range groups {
		if !g.IsDir() || !validPart(g.Name()) {
			continue
		}
		f, ok, err := s.tryLock(g.Name())
		if err != nil {
			return 0, err
		}
		if ok {
			locks = append(locks, f)
		} else {
			held[g.Name()] = true
		}
	}
	var freed int64
	err = s.update(func(used int64) (int64, error) {
		if used <= max {
			return used, nil
		}
		next, err := s.evict(used, max, func(g string) bool { return held[g] })
		freed = used - next
		return next, err
	})
	return freed, err
}
