package reader

import (
	"encoding/base64"
	"errors"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// A fast decoder for TOC JSON as estargz writers produce it: ASCII
// strings without escapes, plain integers, the fields of a TOC entry with
// their exact names. It reads the common TOC several times faster than
// encoding/json, whose reflection was most of the time a large layer
// took to open. On anything else it gives up (errSlowPath), and parseTOC
// reads the TOC with encoding/json instead, which decides what it means
// and which errors it has; FuzzParseTOC checks that both agree.

var errSlowPath = errors.New("TOC JSON needs the general decoder")

// errTwoEntries refuses a TOC with two entries arrays: encoding/json
// (the estargz library) would decode the second over the first's entries,
// field by field, which no writer means.
var errTwoEntries = errors.New("two entries arrays")

type tocScanner struct {
	b []byte
	i int
}

func (s *tocScanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// peek skips whitespace and returns the next byte, or 0 at the end.
func (s *tocScanner) peek() byte {
	s.ws()
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

func (s *tocScanner) expect(c byte) error {
	if s.peek() != c {
		return errSlowPath
	}
	s.i++
	return nil
}

// str reads a string of printable ASCII without escapes and returns its
// bytes, which alias the input.
func (s *tocScanner) str() ([]byte, error) {
	if s.peek() != '"' {
		return nil, errSlowPath
	}
	start := s.i + 1
	for j := start; j < len(s.b); j++ {
		c := s.b[j]
		if c == '"' {
			s.i = j + 1
			return s.b[start:j], nil
		}
		if c < 0x20 || c >= 0x80 || c == '\\' {
			return nil, errSlowPath
		}
	}
	return nil, errSlowPath
}

// null reads a null if one is next.
func (s *tocScanner) null() bool {
	if s.peek() == 'n' && len(s.b)-s.i >= 4 && string(s.b[s.i:s.i+4]) == "null" {
		s.i += 4
		return true
	}
	return false
}

// setStr reads a string (or a null, which leaves *p alone) into *p.
func (s *tocScanner) setStr(p *string) error {
	if s.null() {
		return nil
	}
	b, err := s.str()
	if err == nil {
		*p = string(b)
	}
	return err
}

// setInt reads an integer of the form -?(0|[1-9][0-9]*) (or a null) into
// *p.
func (s *tocScanner) setInt(p *int64) error {
	if s.null() {
		return nil
	}
	s.ws()
	start := s.i
	j := start
	if j < len(s.b) && s.b[j] == '-' {
		j++
	}
	digits := j
	for j < len(s.b) && s.b[j] >= '0' && s.b[j] <= '9' {
		j++
	}
	if j == digits || (s.b[digits] == '0' && j > digits+1) {
		return errSlowPath
	}
	if j < len(s.b) {
		switch s.b[j] {
		case '.', 'e', 'E':
			return errSlowPath // encoding/json has its own word on these
		}
	}
	v, err := strconv.ParseInt(string(s.b[start:j]), 10, 64)
	if err != nil {
		return errSlowPath
	}
	s.i = j
	*p = v
	return nil
}

func (s *tocScanner) setIntInt(p *int) error {
	v := int64(*p)
	if err := s.setInt(&v); err != nil {
		return err
	}
	if int64(int(v)) != v {
		return errSlowPath
	}
	*p = int(v)
	return nil
}

// xattrs reads an object of base64 strings (or a null) into *p, adding to
// a map already there as encoding/json does.
func (s *tocScanner) xattrs(p *map[string][]byte) error {
	if s.null() {
		*p = nil
		return nil
	}
	if *p == nil {
		*p = map[string][]byte{}
	}
	return s.object(func(k []byte) error {
		if s.null() {
			(*p)[string(k)] = nil
			return nil
		}
		v, err := s.str()
		if err != nil {
			return err
		}
		d := make([]byte, base64.StdEncoding.DecodedLen(len(v)))
		n, err := base64.StdEncoding.Decode(d, v)
		if err != nil {
			return errSlowPath
		}
		(*p)[string(k)] = d[:n]
		return nil
	})
}

// object reads an object, calling member with each key; member reads the
// key's value.
func (s *tocScanner) object(member func(key []byte) error) error {
	if err := s.expect('{'); err != nil {
		return err
	}
	if s.peek() == '}' {
		s.i++
		return nil
	}
	for {
		k, err := s.str()
		if err != nil {
			return err
		}
		if err := s.expect(':'); err != nil {
			return err
		}
		if err := member(k); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case '}':
			s.i++
			return nil
		default:
			return errSlowPath
		}
	}
}

// entry reads one TOC entry object.
func (s *tocScanner) entry(e *estargz.TOCEntry) error {
	return s.object(func(k []byte) (err error) {
		switch string(k) {
		case "name":
			err = s.setStr(&e.Name)
		case "type":
			err = s.setStr(&e.Type)
		case "size":
			err = s.setInt(&e.Size)
		case "modtime":
			err = s.setStr(&e.ModTime3339)
		case "linkName":
			err = s.setStr(&e.LinkName)
		case "mode":
			err = s.setInt(&e.Mode)
		case "uid":
			err = s.setIntInt(&e.UID)
		case "gid":
			err = s.setIntInt(&e.GID)
		case "userName":
			err = s.setStr(&e.Uname)
		case "groupName":
			err = s.setStr(&e.Gname)
		case "offset":
			err = s.setInt(&e.Offset)
		case "innerOffset":
			err = s.setInt(&e.InnerOffset)
		case "devMajor":
			err = s.setIntInt(&e.DevMajor)
		case "devMinor":
			err = s.setIntInt(&e.DevMinor)
		case "xattrs":
			err = s.xattrs(&e.Xattrs)
		case "digest":
			err = s.setStr(&e.Digest)
		case "chunkOffset":
			err = s.setInt(&e.ChunkOffset)
		case "chunkSize":
			err = s.setInt(&e.ChunkSize)
		case "chunkDigest":
			err = s.setStr(&e.ChunkDigest)
		default:
			return errSlowPath
		}
		return err
	})
}

// scanTOC decodes TOC JSON in the form estargz writes it, calling add
// with each entry in turn, checking limits as parseEntries does, or
// returns errSlowPath. The entry passed to add is reused for the next
// one: add must copy what it keeps (maps and strings it may keep).
func scanTOC(b []byte, add func(*estargz.TOCEntry) error) (version int, err error) {
	s := &tocScanner{b: b}
	seen := false
	err = s.object(func(k []byte) error {
		switch string(k) {
		case "version":
			return s.setIntInt(&version)
		case "entries":
			if seen {
				return errTwoEntries
			}
			seen = true
			return s.entries(add)
		}
		return errSlowPath
	})
	return version, err
}

// entries reads the entries array (or a null), passing each to add.
func (s *tocScanner) entries(add func(*estargz.TOCEntry) error) error {
	if s.null() {
		return nil
	}
	if err := s.expect('['); err != nil {
		return err
	}
	if s.peek() == ']' {
		s.i++
		return nil
	}
	var e estargz.TOCEntry
	for n := 0; ; n++ {
		if n == MaxEntries {
			return errTooManyEntries // the general decoder would read them all again to say so
		}
		e = estargz.TOCEntry{}
		if err := s.entry(&e); err != nil {
			return err
		}
		if err := checkEntry(n, &e); err != nil {
			return err
		}
		if err := add(&e); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case ']':
			s.i++
			return nil
		default:
			return errSlowPath
		}
	}
}
