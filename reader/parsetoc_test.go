package reader

import (
	"fmt"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// The tests that compare TOC decoders (FuzzParseTOC, FuzzTree) read a TOC
// whole, as the estargz library does; Open reads it entry by entry.

// parseTOC decodes TOC JSON into the estargz library's form, for tests
// that compare decoders.
func parseTOC(b []byte) (*estargz.JTOC, error) {
	toc, err := parseTOCFast(b)
	if err == errSlowPath {
		return parseTOCSlow(b)
	}
	if err != nil {
		return nil, fmt.Errorf("TOC JSON: %w", err)
	}
	return toc, nil
}

// parseTOCFast is scanTOC collecting the entries, for the tests that hold
// it to encoding/json.
func parseTOCFast(b []byte) (*estargz.JTOC, error) {
	toc := new(estargz.JTOC)
	var err error
	toc.Version, err = scanTOC(b, func(e *estargz.TOCEntry) error {
		c := *e
		toc.Entries = append(toc.Entries, &c)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return toc, nil
}
