package qcow2

import (
	"fmt"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// OverlapChecks is QAPI's Qcow2OverlapChecks alternate: a mode name
// ("none", "constant", "cached", "all") or a Qcow2OverlapCheckFlags
// object. It is accepted and validated; this driver does not run QEMU's
// overlap checks (its allocator never hands out metadata clusters, and
// the checks are a debugging aid in QEMU).
type OverlapChecks struct {
	Mode  string
	Flags map[string]any
}

var overlapModes = []string{"none", "constant", "cached", "all"}

var overlapFlags = map[string]bool{
	"template": true, "main-header": true, "active-l1": true, "active-l2": true,
	"refcount-table": true, "refcount-block": true, "snapshot-table": true,
	"inactive-l1": true, "inactive-l2": true, "bitmap-directory": true,
}

// UnmarshalQAPI implements the alternate.
func (o *OverlapChecks) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	switch t := v.(type) {
	case string:
		for _, m := range overlapModes {
			if t == m {
				o.Mode = t
				return nil
			}
		}
		return qapi.Errorf(qapi.GenericError, "Parameter '%s' does not accept value '%s'", path, t)
	case map[string]any:
		for k := range t {
			if !overlapFlags[k] {
				return qapi.Errorf(qapi.GenericError, "Parameter '%s.%s' is unexpected", path, k)
			}
		}
		o.Flags = t
		return nil
	}
	return qapi.Errorf(qapi.GenericError, "Invalid parameter type for '%s', expected: object", path)
}

// Options is QEMU 7.2's BlockdevOptionsQcow2 (with the base
// BlockdevOptionsGenericCOWFormat: file, backing).
type Options struct {
	File    graph.ChildRef  `qapi:"file"`
	Backing *graph.ChildRef `qapi:"backing,optional"`
	// DataFile is the external data file (BlockdevRef).
	DataFile           *graph.ChildRef `qapi:"data-file,optional"`
	LazyRefcounts      *bool           `qapi:"lazy-refcounts,optional"`
	PassDiscardRequest *bool           `qapi:"pass-discard-request,optional"`
	PassDiscardSnap    *bool           `qapi:"pass-discard-snapshot,optional"`
	PassDiscardOther   *bool           `qapi:"pass-discard-other,optional"`
	OverlapCheck       *OverlapChecks  `qapi:"overlap-check,optional"`
	CacheSize          *int64          `qapi:"cache-size,optional"`
	L2CacheSize        *int64          `qapi:"l2-cache-size,optional"`
	L2CacheEntrySize   *int64          `qapi:"l2-cache-entry-size,optional"`
	RefcountCacheSize  *int64          `qapi:"refcount-cache-size,optional"`
	CacheCleanInterval *int64          `qapi:"cache-clean-interval,optional"`
	// Encrypt is BlockdevQcow2Encryption (format, key-secret), decoded
	// by parseOpenEncrypt (crypt.go).
	Encrypt map[string]any `qapi:"encrypt,optional"`
}

// Version is BlockdevQcow2Version.
type Version string

// EnumValues lists QEMU's values.
func (Version) EnumValues() []string { return []string{"v2", "v3"} }

// CompressionType is Qcow2CompressionType.
type CompressionType string

// EnumValues lists QEMU's values.
func (CompressionType) EnumValues() []string { return []string{"zlib", "zstd"} }

// PreallocMode is QAPI's PreallocMode.
type PreallocMode string

// EnumValues lists QEMU's values.
func (PreallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

// CreateOptions is BlockdevCreateOptionsQcow2.
type CreateOptions struct {
	// File is the node to format; only a node name is accepted (the
	// create job cannot open nested options).
	File          graph.ChildRef        `qapi:"file"`
	DataFile      *graph.ChildRef       `qapi:"data-file,optional"`
	DataFileRaw   bool                  `qapi:"data-file-raw,optional"`
	ExtendedL2    bool                  `qapi:"extended-l2,optional"`
	Size          qapi.Size             `qapi:"size"`
	Version       Version               `qapi:"version,optional"`
	BackingFile   string                `qapi:"backing-file,optional"`
	BackingFmt    string                `qapi:"backing-fmt,optional"`
	Encrypt       *EncryptCreateOptions `qapi:"encrypt,optional"`
	ClusterSize   qapi.Size             `qapi:"cluster-size,optional"`
	Preallocation PreallocMode          `qapi:"preallocation,optional"`
	LazyRefcounts bool                  `qapi:"lazy-refcounts,optional"`
	RefcountBits  int64                 `qapi:"refcount-bits,optional"`
	Compression   CompressionType       `qapi:"compression-type,optional"`
}

// newOptions has QEMU's defaults: on Linux cache-clean-interval is 600
// seconds.
func newOptions() any {
	interval := int64(600)
	return &Options{CacheCleanInterval: &interval}
}

func newCreateOptions() any {
	return &CreateOptions{Version: "v3", ClusterSize: 65536, Preallocation: "off", RefcountBits: 16, Compression: "zlib"}
}

func init() {
	graph.Register(&graph.Driver{
		Name:             "qcow2",
		NewOptions:       newOptions,
		Open:             open,
		NewCreateOptions: newCreateOptions,
		Create:           create,
		// img create also takes qemu-img's encryption=on (crypt.go).
		NewImageCreateOptions: newImageCreateOptions,
		ImageCreate:           imageCreate,
		Probe:                 probe,
		NewAmendOptions:       newAmendOptions,
		NewQMPAmendOptions:    func() any { return &QMPAmendOptions{} },
		Measure:               measureImage,
		StrongOptions:         strongOptions,
	})
}

// strongOptions: of qcow2's open options only the encryption secret
// makes qemu-storage-daemon 7.2 show a json: filename (not encrypt.format,
// the cache sizes or the discard passing).
func strongOptions(o any) map[string]any {
	opts := o.(*Options)
	if s, ok := opts.Encrypt["key-secret"]; ok {
		return map[string]any{"encrypt.key-secret": s}
	}
	return nil
}

// probe recognises the magic and a version we read.
func probe(hdr []byte, _ string) int {
	if len(hdr) >= 8 && be.Uint32(hdr) == Magic && be.Uint32(hdr[4:]) >= 2 {
		return 100
	}
	return 0
}

// Cache sizing (QEMU's docs/qcow2-cache.txt for 7.2): the L2 cache is by
// default as large as needed to cover the whole disk, at most 32 MiB; the
// refcount cache is 4 clusters. Both hold at least 2 tables.
const (
	defaultL2CacheMax = 32 << 20
	refcountCacheMin  = 4 // clusters
	minCacheEntries   = 2
)

type cacheSizes struct {
	l2Bytes, l2Entry, rcBytes int64
}

// resolveCacheSizes applies cache-size, l2-cache-size, refcount-cache-size
// and l2-cache-entry-size with QEMU's rules and messages.
func resolveCacheSizes(o *Options, g Geometry, size int64) (cacheSizes, error) {
	cs := g.ClusterSize()
	maxL2 := int64(g.L1SizeFor(size)) * cs // bytes of L2 tables covering the disk
	if maxL2 < cs*minCacheEntries {
		maxL2 = cs * minCacheEntries
	}
	r := cacheSizes{l2Entry: cs}
	if o.L2CacheEntrySize != nil {
		e := *o.L2CacheEntrySize
		if e < 512 || e > cs || e&(e-1) != 0 {
			return r, qapi.Errorf(qapi.GenericError,
				"L2 cache entry size must be a power of two between %d and the cluster size (%d)", 512, cs)
		}
		r.l2Entry = e
	}
	minRC := refcountCacheMin * cs
	switch {
	case o.CacheSize != nil && o.L2CacheSize != nil && o.RefcountCacheSize != nil:
		return r, qapi.Errorf(qapi.GenericError, "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
	case o.CacheSize != nil:
		total := *o.CacheSize
		switch {
		case o.L2CacheSize != nil:
			if *o.L2CacheSize > total {
				return r, qapi.Errorf(qapi.GenericError, "l2-cache-size may not exceed cache-size")
			}
			r.l2Bytes, r.rcBytes = *o.L2CacheSize, total-*o.L2CacheSize
		case o.RefcountCacheSize != nil:
			if *o.RefcountCacheSize > total {
				return r, qapi.Errorf(qapi.GenericError, "refcount-cache-size may not exceed cache-size")
			}
			r.rcBytes, r.l2Bytes = *o.RefcountCacheSize, total-*o.RefcountCacheSize
		default:
			// As QEMU: the L2 cache gets what covers the disk, the
			// refcount cache the rest (at least its minimum).
			r.l2Bytes = min(maxL2, max(total-minRC, 0))
			r.rcBytes = max(total-r.l2Bytes, minRC)
		}
	default:
		r.l2Bytes = min(maxL2, defaultL2CacheMax)
		if o.L2CacheSize != nil {
			r.l2Bytes = min(*o.L2CacheSize, maxL2)
		}
		r.rcBytes = minRC
		if o.RefcountCacheSize != nil {
			r.rcBytes = *o.RefcountCacheSize
		}
	}
	if r.l2Bytes < 0 || r.rcBytes < 0 {
		return r, qapi.Errorf(qapi.GenericError, "cache sizes must not be negative")
	}
	r.l2Bytes = max(r.l2Bytes, minCacheEntries*r.l2Entry)
	r.rcBytes = max(r.rcBytes, minCacheEntries*cs)
	return r, nil
}

func boolOr(p *bool, def bool) bool {
	if p == nil {
		return def
	}
	return *p
}

func (o *Options) validate() error {
	if o.CacheCleanInterval != nil && (*o.CacheCleanInterval < 0 || *o.CacheCleanInterval > 1<<31-1) {
		return qapi.Errorf(qapi.GenericError, "Cache clean interval too big")
	}
	if o.DataFile != nil && o.DataFile.Null {
		return fmt.Errorf("Invalid parameter type for 'data-file', expected: object")
	}
	return nil
}
