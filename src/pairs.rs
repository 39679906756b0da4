//! The proxy-wasm pairs encoding, used by the host for header maps and for
//! list- and object-valued properties: u32 count, then per pair u32 key length
//! and u32 value length (little-endian), then each key and value followed by a
//! NUL byte.

/// Decodes `bytes`; `None` unless they are exactly one well-formed encoding.
pub fn decode(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    decode_with(bytes, |k, v| Some((k, v)))
}

/// [`decode`], keeping what `keep` makes of each pair (`None`: skipped) in one
/// allocation.
pub fn decode_with<'a, T>(
    bytes: &'a [u8],
    mut keep: impl FnMut(&'a [u8], &'a [u8]) -> Option<T>,
) -> Option<Vec<T>> {
    let (count, rest) = bytes.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    let table = rest.get(..count.checked_mul(8)?)?;
    let mut data = rest.get(table.len()..)?;
    let mut out = Vec::with_capacity(count);
    // Each item: its bytes, then a NUL; what is left after it.
    let item = |data: &'a [u8], len: usize| -> Option<(&'a [u8], &'a [u8])> {
        let (item, after) = data.split_at_checked(len)?;
        let (&nul, after) = after.split_first()?;
        (nul == 0).then_some((item, after))
    };
    for lengths in table.chunks_exact(8) {
        let (klen, vlen) = lengths.split_at(4);
        let klen = u32::from_le_bytes(klen.try_into().ok()?) as usize;
        let vlen = u32::from_le_bytes(vlen.try_into().ok()?) as usize;
        let (key, after) = item(data, klen)?;
        let (value, after) = item(after, vlen)?;
        data = after;
        if let Some(item) = keep(key, value) {
            out.push(item);
        }
    }
    data.is_empty().then_some(out)
}

pub use decode as decode_pairs;

/// Encodes pairs for the host (local-reply headers, dispatched calls).
pub fn encode(items: &[(&[u8], &[u8])]) -> Vec<u8> {
    let data: usize = items.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + items.len() * 8 + data);
    out.extend((items.len() as u32).to_le_bytes());
    for (k, v) in items {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in items {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let items: Vec<(&[u8], &[u8])> =
            vec![(b":status", b"401"), (b"", b""), (b"k", b"\xff\x00")];
        let bytes = encode(&items);
        assert_eq!(decode(&bytes), Some(items));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    #[test]
    fn encode_sizes_its_buffer_once() {
        // The capacity computed up front is the encoding's exact length (no
        // reallocation while writing): 4 + 8 per pair + each key and value + 2 NULs.
        let items: Vec<(&[u8], &[u8])> = vec![(b":status", b"401"), (b"ab", b"cdef")];
        let bytes = encode(&items);
        assert_eq!(bytes.len(), 4 + 2 * 8 + (7 + 3 + 2) + (2 + 4 + 2));
        assert_eq!(bytes.capacity(), bytes.len());
    }

    #[test]
    fn malformed_is_none() {
        let mut bytes = encode(&[(b"a", b"")]);
        bytes.pop();
        assert_eq!(decode(&bytes), None);
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(decode(&[1, 0, 0]), None);
        assert_eq!(decode(&[]), None);
        let mut extra = encode(&[(b"a", b"")]);
        extra.push(b'x');
        assert_eq!(decode(&extra), None);
        // A count that would overflow the header size.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]), None);
        // Every cut of a well-formed encoding, and every terminator made non-NUL.
        let good = encode(&[(b":path", b"/a"), (b"x", b""), (b"", b"v")]);
        for cut in 0..good.len() {
            assert_eq!(decode(&good[..cut]), None, "cut {cut}");
        }
        let header = 4 + 3 * 8;
        for (i, &b) in good.iter().enumerate().skip(header) {
            if b == 0 {
                let mut bad = good.clone();
                bad[i] = b'x';
                assert_eq!(decode(&bad), None, "NUL {i}");
            }
        }
        // A length that runs past the end.
        let mut long = encode(&[(b"k", b"v")]);
        long[4] = 200;
        assert_eq!(decode(&long), None);
    }
}
