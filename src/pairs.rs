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
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    let count = word(0)?;
    let header = count.checked_mul(8)?.checked_add(4)?;
    if header > bytes.len() {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let mut pos = header;
    for n in 0..count {
        let klen = word(4 + n * 8)?;
        let vlen = word(8 + n * 8)?;
        let key = bytes.get(pos..pos.checked_add(klen)?)?;
        pos += klen;
        if bytes.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let value = bytes.get(pos..pos.checked_add(vlen)?)?;
        pos += vlen;
        if bytes.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        if let Some(item) = keep(key, value) {
            out.push(item);
        }
    }
    (pos == bytes.len()).then_some(out)
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
    }
}
