package layertest

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// CorpusChunkSize is the eStargz chunk size the corpus is built for; the
// files under sizes/ are sized relative to it.
const CorpusChunkSize = 64 << 10

// Random returns n deterministic, random-looking bytes derived from seed.
func Random(seed string, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8(sha256.Sum256([]byte(seed))).Read(b)
	return b
}

// Long names used by the corpus: a 150-byte file name (needs PAX) and a
// path of more than 255 bytes.
var (
	LongName = "long/" + strings.Repeat("n", 150)
	LongPath = "long/" + strings.Repeat("a", 60) + "/" + strings.Repeat("b", 60) + "/" +
		strings.Repeat("c", 60) + "/" + strings.Repeat("d", 60) + "/" + strings.Repeat("e", 60) + "/file"
)

// Corpus returns the test image layers, bottom first. Together they cover
// whiteouts of files and directories, opaque directories, re-creation after
// a whiteout, type changes, metadata-only changes, hard links, devices,
// fifos, xattrs, special mode bits, odd owners, long and unicode names, a
// large directory, chunk-boundary file sizes and all kinds of symlinks.
// Every directory appears before its children with its own metadata.
func Corpus() [][]Entry {
	t0 := DefaultMTime
	t1, t2 := t0.Add(time.Hour), t0.Add(48*time.Hour)
	c := CorpusChunkSize

	base := []Entry{
		Dir("bin"),
		FileString("bin/sh", "#!/bin/true\n", Mode(0o755)),
		Dir("etc", MTime(t0.Add(-time.Hour))),
		FileString("etc/hostname", "layertest\n"),

		// Changed by the layers above.
		Dir("data"),
		FileString("data/keep", "kept\n"),
		FileString("data/del", "whited out in layer 1\n"),
		Fifo("data/pipe", Mode(0o600)),
		Dir("gone"),
		Dir("gone/inner"),
		FileString("gone/inner/f", "gone\n"),
		FileString("gone/top", "gone\n"),
		Dir("opq"),
		FileString("opq/old", "hidden by the opaque marker\n"),
		Dir("opq/sub"),
		FileString("opq/sub/deep", "hidden too\n"),
		FileString("wh-file", "whited out in layer 1\n"),
		FileString("recreate", "first version\n"),
		FileString("f2d", "becomes a directory\n"),
		Dir("d2f"),
		FileString("d2f/child", "its directory becomes a file\n"),
		FileString("meta", "same content\n"),
		Dir("metadir"),
		FileString("metadir/child", "parent changes mode and owner\n"),

		// Hard links: a, b and sub/c share one inode; x and y another.
		Dir("hard"),
		FileString("hard/a", "three names\n", Mode(0o640), Owner(1000, 1001)),
		Hardlink("hard/b", "hard/a", Mode(0o640), Owner(1000, 1001)),
		Dir("hard/sub"),
		Hardlink("hard/sub/c", "hard/a", Mode(0o640), Owner(1000, 1001)),
		FileString("hard/x", "two names\n", Xattr("user.linked", "yes")),
		Hardlink("hard/y", "hard/x", Xattr("user.linked", "yes")),

		Dir("dev"),
		Char("dev/null", 1, 3, Mode(0o666)),
		Char("dev/zero", 1, 5, Mode(0o666)),
		Block("dev/sda", 8, 0, Mode(0o660), Owner(0, 6)),
		Fifo("dev/fifo"),

		// Extended attributes (not on symlinks: Linux refuses user.* there).
		Dir("xattr", Xattr("user.dir", "directory")),
		FileString("xattr/one", "1\n", Xattr("user.comment", "hello")),
		FileString("xattr/many", "m\n", Xattr("user.a", "alpha"), Xattr("user.b", "beta"),
			Xattr("user.long", strings.Repeat("x", 1000))),

		Dir("modes"),
		FileString("modes/setuid", "u\n", Mode(0o4755)),
		FileString("modes/setgid", "g\n", Mode(0o2755)),
		FileString("modes/both", "ug\n", Mode(0o6755)),
		Dir("modes/sticky", Mode(0o1777)),
		Dir("modes/setgid-dir", Mode(0o2775)),
		FileString("modes/private", "p\n", Mode(0o600)),
		FileString("modes/readonly", "r\n", Mode(0o444)),
		FileString("modes/none", "n\n", Mode(0)),

		Dir("owners", MTime(t1)),
		FileString("owners/user", "u\n", Owner(1000, 1001)),
		FileString("owners/nobody", "n\n", Owner(65534, 65534)),
		Dir("owners/dir", Mode(0o750), Owner(1000, 1001)),
		FileString("owners/dir/f", "f\n", Owner(1000, 1001), MTime(t2)),
		Symlink("owners/link", "user", Owner(1000, 1001)),

		Dir("unicode"),
		FileString("unicode/héllo wörld.txt", "latin\n"),
		Dir("unicode/日本語"),
		FileString("unicode/日本語/ファイル.txt", "japanese\n"),
		Dir("unicode/with space"),
		FileString("unicode/with space/ leading and trailing ", "spaces\n"),
		FileString("unicode/emoji-🎉", "party\n"),

		Dir("sizes"),
		File("sizes/empty", nil),
		File("sizes/one", []byte{'1'}),
		File("sizes/chunk-1", Random("chunk-1", c-1)),
		File("sizes/chunk", Random("chunk", c)),
		File("sizes/chunk+1", Random("chunk+1", c+1)),
		File("sizes/many", Random("many", 7*c+4321)),

		Dir("links"),
		Symlink("links/rel", "../sizes/one"),
		Symlink("links/abs", "/etc/hostname"),
		Symlink("links/dangling", "does/not/exist"),
		Symlink("links/todir", "../sizes"),
		Symlink("links/long", "../"+LongPath),
	}

	// Long names: PAX path and linkpath records.
	base = append(base, Dir("long"), FileString(LongName, "long name\n"))
	parts := strings.Split(LongPath, "/")
	for i := 2; i < len(parts); i++ {
		base = append(base, Dir(strings.Join(parts[:i], "/")))
	}
	base = append(base,
		FileString(LongPath, "long path\n"),
		Hardlink(LongPath+"-link", LongPath),
	)

	// A directory with 3000 entries.
	base = append(base, Dir("many"))
	for i := range 3000 {
		n := fmt.Sprintf("many/f%04d", i)
		base = append(base, FileString(n, n+"\n"))
	}

	upper := []Entry{
		Dir("data", MTime(t1)),
		Whiteout("data/del"),
		FileString("data/added", "new in layer 1\n"),
		Whiteout("gone"),
		Whiteout("wh-file"),
		Dir("opq", MTime(t1)),
		Opaque("opq"),
		FileString("opq/new", "only file left\n"),
		Whiteout("recreate"),
		Dir("f2d", Mode(0o750), MTime(t1)),
		FileString("f2d/inside", "was a file\n"),
		FileString("d2f", "was a directory\n", MTime(t1)),
		FileString("meta", "same content\n", Mode(0o600), Owner(1000, 1001), MTime(t1)),
		Dir("metadir", Mode(0o700), Owner(1000, 1001), MTime(t1)),
	}

	top := []Entry{
		FileString("recreate", "second version\n", MTime(t2)),
		Dir("gone", MTime(t2)),
		FileString("gone/new", "recreated directory\n"),
	}
	return [][]Entry{base, upper, top}
}

// BigFileName is the path of the file in BigFileLayer.
const BigFileName = "big/file"

// BigFileLayer returns a layer holding one size-byte file at BigFileName
// with the content of BigFileContent.
func BigFileLayer(size int64) []Entry {
	return []Entry{Dir("big"), File(BigFileName, BigFileContent(size))}
}

// BigFileContent returns size random-looking bytes (Random seeded with
// BigFileName). Random data is cheap to generate and, unlike a regular
// pattern, fast to gzip even at the eStargz default level (~4 s for 200 MiB).
func BigFileContent(size int64) []byte {
	return Random(BigFileName, int(size))
}
