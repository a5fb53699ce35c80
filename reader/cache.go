package reader

import (
	"fmt"

	"github.com/dgraph-io/ristretto/v2"
)

// Cache holds decompressed, verified chunks in memory within a byte budget.
// One Cache may be shared by all layers of a process.
type Cache struct {
	c *ristretto.Cache[string, []byte]
}

// NewCache returns a cache of at most maxBytes of chunk data.
func NewCache(maxBytes int64) *Cache {
	if maxBytes < 1<<20 {
		maxBytes = 1 << 20
	}
	// Ten counters per expected item; chunks are rarely below 16 KiB.
	counters := max(maxBytes/(16<<10)*10, 1000)
	c, err := ristretto.NewCache(&ristretto.Config[string, []byte]{
		NumCounters:        counters,
		MaxCost:            maxBytes,
		BufferItems:        64,
		IgnoreInternalCost: true,
	})
	if err != nil {
		// Only invalid configuration errors; ours is fixed and valid.
		panic(fmt.Sprintf("reader: ristretto config: %v", err))
	}
	return &Cache{c: c}
}

func (c *Cache) get(key string) ([]byte, bool) { return c.c.Get(key) }

func (c *Cache) set(key string, b []byte) { c.c.Set(key, b, int64(len(b))) }

// Close releases the cache's goroutines.
func (c *Cache) Close() { c.c.Close() }
