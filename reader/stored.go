package reader

import "encoding/binary"

// Incompressible data (media, archives, model weights: the big files of
// big images) is stored by gzip writers in "stored" deflate blocks: the
// bytes themselves behind a five-byte header. Decompressing such a member
// through flate copies every byte twice (into its window, then out);
// storedChunk copies it once.

// gzip header flags (RFC 1952).
const (
	gzipFHCRC    = 1 << 1
	gzipFEXTRA   = 1 << 2
	gzipFNAME    = 1 << 3
	gzipFCOMMENT = 1 << 4
)

// storedChunk returns the size bytes at inner in the decompressed gzip
// member comp when the member holds only stored blocks, copied into a new
// buffer. ok is false for anything else (compressed blocks, a malformed or
// short member), which the caller decodes the general way, with its errors.
func storedChunk(comp []byte, inner, size int64) (data []byte, ok bool) {
	p, ok := gzipBody(comp)
	if !ok {
		return nil, false
	}
	// One pass to find that every block is stored and that the member
	// holds the bytes, a second to copy them: no buffer is allocated for a
	// member that turns out not to qualify.
	for pass := 0; pass < 2; pass++ {
		q, pos := p, int64(0) // q: offset in comp; pos: decompressed offset
		done := int64(0)      // bytes of the chunk copied
		for {
			if q+5 > len(comp) || comp[q]&0b110 != 0 { // BTYPE 00: stored
				return nil, false
			}
			final := comp[q]&1 == 1
			n := int(binary.LittleEndian.Uint16(comp[q+1:]))
			if binary.LittleEndian.Uint16(comp[q+3:]) != ^uint16(n) || q+5+n > len(comp) {
				return nil, false
			}
			block := comp[q+5 : q+5+n]
			// The part of [pos, pos+n) inside [inner, inner+size).
			from, to := max(inner, pos), min(inner+size, pos+int64(n))
			if from < to {
				if pass == 1 {
					copy(data[from-inner:], block[from-pos:to-pos])
				}
				done += to - from
			}
			pos += int64(n)
			q += 5 + n
			if final || pos >= inner+size {
				break
			}
		}
		if pos < inner+size { // flate would find the member too short
			return nil, false
		}
		if pass == 0 {
			data = newBuffer(size)
		}
	}
	return data, true
}

// gzipBody returns the offset of the deflate data in gzip member m, past
// its header, or false when m does not start with a gzip header.
func gzipBody(m []byte) (int, bool) {
	if len(m) < 10 || m[0] != 0x1f || m[1] != 0x8b || m[2] != 8 {
		return 0, false
	}
	flg, p := m[3], 10
	if flg&0xe0 != 0 || flg&gzipFHCRC != 0 {
		return 0, false // reserved bits, which gzip readers refuse; a header CRC, left to them
	}
	if flg&gzipFEXTRA != 0 {
		if p+2 > len(m) {
			return 0, false
		}
		p += 2 + int(binary.LittleEndian.Uint16(m[p:]))
	}
	for _, f := range []byte{gzipFNAME, gzipFCOMMENT} {
		if flg&f == 0 {
			continue
		}
		for p < len(m) && m[p] != 0 {
			p++
		}
		p++ // the terminating zero
	}
	return p, p <= len(m)
}
