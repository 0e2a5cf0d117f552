package qcow2

import (
	"container/list"
	"context"
	"fmt"
	"sort"

	"blockbackend/graph"
)

// tableCache is a bounded write-back cache of metadata tables (L2 table
// slices or refcount blocks) of one fixed entry size, keyed by their host
// offset. It has no lock of its own: the image's meta mutex guards it.
//
// A buffer returned by get stays valid only until the next call on the
// same cache (a later call may evict it); callers re-get after anything
// that can allocate.
type tableCache struct {
	name      string
	entrySize int64
	max       int
	file      *graph.Node
	m         map[int64]*list.Element
	lru       *list.List // front: most recently used; values *cacheEntry
	// beforeWrite runs before a dirty entry is written back (evicted or
	// flushed): the L2 cache uses it to make refcount increments stable
	// first (qcow2.txt: a cluster's refcount must cover every reference
	// to it on disk).
	beforeWrite func(ctx context.Context) error
	ndirty      int
}

type cacheEntry struct {
	off   int64
	buf   []byte
	dirty bool
}

func newTableCache(name string, file *graph.Node, entrySize, bytes int64) *tableCache {
	n := int(bytes / entrySize)
	if n < minCacheEntries {
		n = minCacheEntries
	}
	return &tableCache{name: name, entrySize: entrySize, max: n, file: file,
		m: map[int64]*list.Element{}, lru: list.New()}
}

// get returns the table at off, reading it on a miss.
func (c *tableCache) get(ctx context.Context, off int64) ([]byte, error) {
	if el := c.m[off]; el != nil {
		c.lru.MoveToFront(el)
		return el.Value.(*cacheEntry).buf, nil
	}
	buf := make([]byte, c.entrySize)
	if err := c.file.ReadV(ctx, off, [][]byte{buf}); err != nil {
		return nil, fmt.Errorf("qcow2: reading %s at %#x: %w", c.name, off, err)
	}
	if err := c.insert(ctx, off, buf, false); err != nil {
		return nil, err
	}
	return buf, nil
}

// getNew returns a zeroed table at off without reading it (a table just
// allocated), marked dirty.
func (c *tableCache) getNew(ctx context.Context, off int64) ([]byte, error) {
	if el := c.m[off]; el != nil {
		e := el.Value.(*cacheEntry)
		clear(e.buf)
		c.setDirty(e)
		c.lru.MoveToFront(el)
		return e.buf, nil
	}
	buf := make([]byte, c.entrySize)
	if err := c.insert(ctx, off, buf, true); err != nil {
		return nil, err
	}
	return buf, nil
}

func (c *tableCache) insert(ctx context.Context, off int64, buf []byte, dirty bool) error {
	for c.lru.Len() >= c.max {
		if err := c.evictOne(ctx); err != nil {
			return err
		}
	}
	e := &cacheEntry{off: off, buf: buf}
	c.m[off] = c.lru.PushFront(e)
	if dirty {
		c.setDirty(e)
	}
	return nil
}

func (c *tableCache) setDirty(e *cacheEntry) {
	if !e.dirty {
		e.dirty = true
		c.ndirty++
	}
}

// markDirty marks the table at off (which must be cached) for write-back.
func (c *tableCache) markDirty(off int64) {
	if el := c.m[off]; el != nil {
		c.setDirty(el.Value.(*cacheEntry))
	}
}

// evictOne writes back and drops the least recently used entry.
func (c *tableCache) evictOne(ctx context.Context) error {
	el := c.lru.Back()
	if el == nil {
		return nil
	}
	e := el.Value.(*cacheEntry)
	if e.dirty {
		if err := c.writeBack(ctx, []*cacheEntry{e}); err != nil {
			return err
		}
	}
	c.lru.Remove(el)
	delete(c.m, e.off)
	return nil
}

func (c *tableCache) writeBack(ctx context.Context, es []*cacheEntry) error {
	if c.beforeWrite != nil {
		if err := c.beforeWrite(ctx); err != nil {
			return err
		}
	}
	for _, e := range es {
		if err := c.file.WriteV(ctx, e.off, [][]byte{e.buf}, 0); err != nil {
			return fmt.Errorf("qcow2: writing %s at %#x: %w", c.name, e.off, err)
		}
		e.dirty = false
		c.ndirty--
	}
	return nil
}

// flush writes every dirty entry, in offset order, and reports whether
// anything was written. It does not flush the file.
func (c *tableCache) flush(ctx context.Context) (bool, error) {
	if c.ndirty == 0 {
		return false, nil
	}
	var es []*cacheEntry
	for el := c.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*cacheEntry); e.dirty {
			es = append(es, e)
		}
	}
	sort.Slice(es, func(i, j int) bool { return es[i].off < es[j].off })
	return true, c.writeBack(ctx, es)
}

// drop forgets the tables in [off, off+n) without writing them (their
// clusters were freed).
func (c *tableCache) drop(off, n int64) {
	for o := off; o < off+n; o += c.entrySize {
		if el := c.m[o]; el != nil {
			if el.Value.(*cacheEntry).dirty {
				c.ndirty--
			}
			c.lru.Remove(el)
			delete(c.m, o)
		}
	}
}

// dropClean forgets every clean entry (cache-clean-interval).
func (c *tableCache) dropClean() {
	for el := c.lru.Front(); el != nil; {
		next := el.Next()
		if e := el.Value.(*cacheEntry); !e.dirty {
			c.lru.Remove(el)
			delete(c.m, e.off)
		}
		el = next
	}
}

// dirty reports whether any entry waits for write-back.
func (c *tableCache) dirty() bool { return c.ndirty > 0 }

// has reports whether the table at off is cached (a get would do no I/O).
func (c *tableCache) has(off int64) bool {
	_, ok := c.m[off]
	return ok
}
