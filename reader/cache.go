package reader

import (
	"container/list"
	"fmt"
	"sync"

	"github.com/dgraph-io/ristretto/v2"
)

// Cache holds decompressed, verified chunks in memory within a byte budget.
// One Cache may be shared by all layers of a process.
//
// It has two tiers. Fresh chunks go to a small LRU (a quarter of the
// budget): ristretto's TinyLFU admission rejects a new item in favour of
// often-read ones, which would make a sequential reader fetch the chunk it
// just fetched again for every 128 KiB read. Chunks leaving the LRU are
// offered to ristretto, which keeps the ones worth keeping.
type Cache struct {
	c *ristretto.Cache[string, []byte]

	mu        sync.Mutex // guards recent, index and used
	recent    *list.List // of *entry, most recent first
	index     map[string]*list.Element
	used, max int64
}

type entry struct {
	key  string
	data []byte
}

// NewCache returns a cache of at most maxBytes of chunk data.
func NewCache(maxBytes int64) *Cache {
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
	return &Cache{c: c, recent: list.New(), index: map[string]*list.Element{}, max: recent}
}

func (c *Cache) get(key string) ([]byte, bool) {
	c.mu.Lock()
	if el, ok := c.index[key]; ok {
		c.recent.MoveToFront(el)
		c.mu.Unlock()
		return el.Value.(*entry).data, true
	}
	c.mu.Unlock()
	return c.c.Get(key)
}

// set stores a freshly fetched chunk in the LRU tier, moving what it
// evicts there to ristretto.
func (c *Cache) set(key string, b []byte) {
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
