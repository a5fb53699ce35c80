package reader

import (
	"container/list"
	"fmt"
	"runtime"
	"strings"
	"sync"

	"github.com/dgraph-io/ristretto/v2"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
)

// Store is a cache below memory, such as the on-disk lru.Store. Keys are
// "LAYER/NAME", LAYER being the name given with WithName (use the layer
// digest: layers sharing a Store must have distinct names).
type Store interface {
	// Get returns the bytes put under key, or false.
	Get(key string) ([]byte, bool)
	// Put stores b under key; failing to only costs a later miss.
	Put(key string, b []byte) error
}

// CacheOption configures NewCache.
type CacheOption func(*Cache)

// WithStore puts s below the memory cache: misses are looked up there and
// every chunk stored in memory is written there too. The default is none.
func WithStore(s Store) CacheOption { return func(c *Cache) { c.store = s } }

// Cache holds decompressed, verified chunks in memory within a byte budget,
// over an optional Store. One Cache may be shared by all layers of a
// process.
//
// It has two tiers. Fresh chunks go to a small LRU (a quarter of the
// budget): ristretto's TinyLFU admission rejects a new item in favour of
// often-read ones, which would make a sequential reader fetch the chunk it
// just fetched again for every 128 KiB read. Chunks leaving the LRU are
// offered to ristretto, which keeps the ones worth keeping.
type Cache struct {
	c     *ristretto.Cache[string, []byte]
	store Store              // nil: memory only
	loads singleflight.Group // one store read per key at a time

	mu        sync.Mutex // guards recent, index and used
	recent    *list.List // of *entry, most recent first
	index     map[string]*list.Element
	used, max int64

	// Store writes happen in the background, so that a read does not
	// wait for the disk; past maxQueued bytes queued, set writes itself.
	wmu     sync.Mutex        // guards pending, queued, closed and paused
	pending map[string][]byte // by store key: chunks queued for the store
	queued  int64             // bytes in pending
	closed  bool
	paused  int         // pauseWrites calls not yet resumed
	resumed *sync.Cond  // on wmu: paused reached 0, or closed
	writes  chan string // store keys of pending, in order
	written sync.WaitGroup
}

// maxQueued bounds the chunk bytes waiting to be written to the store.
const maxQueued = 32 << 20

type entry struct {
	key  string
	data []byte
}

// NewCache returns a cache of at most maxBytes of chunk data in memory.
func NewCache(maxBytes int64, opts ...CacheOption) *Cache {
	if maxBytes < 1<<20 {
		maxBytes = 1 << 20
	}
	recent := maxBytes / 4
	rest := maxBytes - recent
	// Ten counters per expected item; chunks are rarely below 16 KiB.
	counters := max(rest/(16<<10)*10, 1000)
	c, err := ristretto.NewCache(&ristretto.Config[string, []byte]{
		NumCounters:        counters,
		MaxCost:            rest,
		BufferItems:        64,
		IgnoreInternalCost: true,
	})
	if err != nil {
		// Only invalid configuration errors; ours is fixed and valid.
		panic(fmt.Sprintf("reader: ristretto config: %v", err))
	}
	cache := &Cache{c: c, recent: list.New(), index: map[string]*list.Element{}, max: recent}
	for _, o := range opts {
		o(cache)
	}
	cache.resumed = sync.NewCond(&cache.wmu)
	if cache.store != nil {
		cache.pending = map[string][]byte{}
		cache.writes = make(chan string, 1024)
		cache.written.Add(1)
		go cache.writer()
	}
	return cache
}

// writer writes queued chunks to the store until Close, on a thread of
// its own at the lowest CPU priority: copying chunks into the page cache
// was a fifth of the server's CPU in a cold sequential read, and it is
// never what a reader waits for. The thread uses the CPU the readers, the
// fetches and the rest of the machine leave idle; when it falls behind
// by maxQueued, set writes at normal priority.
func (c *Cache) writer() {
	defer c.written.Done()
	runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19)
	for k := range c.writes {
		c.wmu.Lock()
		for c.paused > 0 && !c.closed {
			c.resumed.Wait()
		}
		b := c.pending[k]
		c.wmu.Unlock()
		c.store.Put(k, b)
		c.wmu.Lock()
		delete(c.pending, k)
		c.queued -= int64(len(b))
		c.wmu.Unlock()
	}
}

// pauseWrites holds the store writer back, leaving the CPU to work that is
// waited for (a prefetch before the mount is ready), until resume is
// called. Chunks queue meanwhile, up to maxQueued; past it, set writes
// them itself.
func (c *Cache) pauseWrites() (resume func()) {
	c.wmu.Lock()
	c.paused++
	c.wmu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			c.wmu.Lock()
			c.paused--
			if c.paused == 0 {
				c.resumed.Broadcast()
			}
			c.wmu.Unlock()
		})
	}
}

// queue hands b to the writer, or reports false when the queue is full or
// closed.
func (c *Cache) queue(k string, b []byte) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, ok := c.pending[k]; ok {
		return true
	}
	if c.closed || c.queued+int64(len(b)) > maxQueued {
		return false
	}
	select {
	case c.writes <- k:
	default:
		return false
	}
	c.pending[k] = b
	c.queued += int64(len(b))
	return true
}

// queuedBytes returns the chunk queued for the store under store key k.
func (c *Cache) queuedBytes(k string) ([]byte, bool) {
	if c.pending == nil {
		return nil, false
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b, ok := c.pending[k]
	return b, ok
}

// storeKey maps a memory key "LAYER@OFF+INNER" to a Store key.
func storeKey(key string) string { return strings.Replace(key, "@", "/", 1) }

// get looks in memory, then in the store, keeping what the store has in
// memory.
func (c *Cache) get(key string) ([]byte, bool) {
	if b, ok := c.getMemory(key); ok {
		return b, true
	}
	b, ok, _ := c.getStore(key)
	return b, ok
}

// getStore looks in the store only, keeping what it finds in memory;
// looked is false when there is no store.
func (c *Cache) getStore(key string) (b []byte, ok, looked bool) {
	if c.store == nil {
		return nil, false, false
	}
	// The kernel reads ahead in parallel: the reads of one chunk that
	// miss together share one store read.
	if b, ok := c.queuedBytes(storeKey(key)); ok {
		c.setMemory(key, b)
		return b, true, true
	}
	v, _, _ := c.loads.Do(key, func() (any, error) {
		b, ok := c.store.Get(storeKey(key))
		if !ok {
			return nil, nil
		}
		c.setMemory(key, b)
		return b, nil
	})
	b, _ = v.([]byte)
	return b, b != nil, true
}

// peek returns the chunk under key from memory, the write queue or the
// store, without keeping what the store has in memory.
func (c *Cache) peek(key string) ([]byte, bool) {
	if b, ok := c.getMemory(key); ok {
		return b, true
	}
	if c.store == nil {
		return nil, false
	}
	if b, ok := c.queuedBytes(storeKey(key)); ok {
		return b, true
	}
	return c.store.Get(storeKey(key))
}

// has reports whether key is cached, without reading it from the store
// when the store can tell (a Has(key) bool method).
func (c *Cache) has(key string) bool {
	if _, ok := c.getMemory(key); ok {
		return true
	}
	if _, ok := c.queuedBytes(storeKey(key)); ok {
		return true
	}
	if h, ok := c.store.(interface{ Has(string) bool }); ok {
		return h.Has(storeKey(key))
	}
	_, ok := c.get(key)
	return ok
}

// inMemory reports whether key is in memory, without counting it as a use.
func (c *Cache) inMemory(key string) bool {
	c.mu.Lock()
	_, ok := c.index[key]
	c.mu.Unlock()
	if ok {
		return true
	}
	_, ok = c.c.GetTTL(key) // ristretto: no access recorded
	return ok
}

func (c *Cache) getMemory(key string) ([]byte, bool) {
	c.mu.Lock()
	if el, ok := c.index[key]; ok {
		c.recent.MoveToFront(el)
		c.mu.Unlock()
		return el.Value.(*entry).data, true
	}
	c.mu.Unlock()
	return c.c.Get(key)
}

// set stores a freshly fetched, verified chunk in memory and in the store.
func (c *Cache) set(key string, b []byte) {
	c.setMemory(key, b)
	if c.store != nil && !c.queue(storeKey(key), b) {
		c.store.Put(storeKey(key), b)
	}
}

// setMemory stores a chunk in the LRU tier, moving what it evicts there to
// ristretto.
func (c *Cache) setMemory(key string, b []byte) {
	size := int64(len(b))
	if size > c.max {
		c.c.Set(key, b, size)
		return
	}
	var out []*entry
	c.mu.Lock()
	if _, ok := c.index[key]; !ok {
		c.index[key] = c.recent.PushFront(&entry{key, b})
		c.used += size
		for c.used > c.max {
			e := c.recent.Remove(c.recent.Back()).(*entry)
			delete(c.index, e.key)
			c.used -= int64(len(e.data))
			out = append(out, e)
		}
	}
	c.mu.Unlock()
	for _, e := range out {
		c.c.Set(e.key, e.data, int64(len(e.data)))
	}
}

// Close writes what is queued for the store and releases the cache's
// goroutines. Close the store after the cache.
func (c *Cache) Close() {
	if c.writes != nil {
		c.wmu.Lock()
		if !c.closed {
			c.closed = true
			close(c.writes)
			c.resumed.Broadcast()
		}
		c.wmu.Unlock()
		c.written.Wait()
	}
	c.c.Close()
}
