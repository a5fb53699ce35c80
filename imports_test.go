package main

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestImportDirection keeps the package graph pointing one way:
// main → mount → reader, with bundle, fetcher and lru importing no project package,
// and test helpers out of the shipped code.
func TestImportDirection(t *testing.T) {
	const module = "github.com/stargz-mount/stargz-mount"
	allowed := map[string][]string{
		".":                   {"bundle", "fetcher", "lru", "mount", "reader", "stats", "unpack"},
		"bundle":              {},
		"mount":               {"reader"},
		"reader":              {},
		"fetcher":             {},
		"lru":                 {},
		"stats":               {},
		"unpack":              {},
		"internal/demo":       {"internal/layertest"},
		"bench":               {"internal/layertest", "internal/netshape"},
		"internal/layertest":  {},
		"internal/netshape":   {},
		"internal/faultproxy": {},
	}
	seen := 0
	err := filepath.WalkDir(".", func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (p == "third_party" || p == "testdata" || strings.HasPrefix(d.Name(), ".")) && p != "." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		pkg := filepath.ToSlash(filepath.Dir(p))
		ok, known := allowed[pkg]
		if !known {
			t.Errorf("package %s is not in the import rules of this test", pkg)
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), p, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			rel, inModule := strings.CutPrefix(path, module+"/")
			if !inModule {
				continue
			}
			seen++
			permitted := false
			for _, a := range ok {
				permitted = permitted || a == rel
			}
			if !permitted {
				t.Errorf("%s imports %s; %s may import only %v", p, rel, pkg, ok)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen == 0 {
		t.Fatal("found no project imports at all: is the test looking at the right tree?")
	}
}
