package reader

import (
	"container/list"
	"fmt"
	"strings"
	"sync"

	"github.com/dgraph-io/ristretto/v2"
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
	store Store // nil: memory only

	mu        sync.Mutex // guards recent, index and used
	recent    *list.List // of *entry, most recent first
	index     map[string]*list.Element
	used, max int64
}

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
	return cache
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
	b, ok = c.store.Get(storeKey(key))
	if ok {
		c.setMemory(key, b)
	}
	return b, ok, true
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
	if c.store != nil {
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

// Close releases the cache's goroutines.
func (c *Cache) Close() { c.c.Close() }
