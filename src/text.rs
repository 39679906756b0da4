//! Bytes as text on the request path.
//!
//! Most of what a request carries (header names, methods, hosts, plain paths,
//! claim names) is ASCII. `std::str::from_utf8` is an out-of-line call whose
//! word-at-a-time loop costs more than the whole check for a short string in the
//! wasm VM; an inlined ASCII check first, then the full UTF-8 check for anything
//! else, reads the same strings at a fraction of the cost (issue #20).

/// `bytes` as a `&str` when they are UTF-8.
#[inline]
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::utf8;

    #[test]
    fn reads_what_from_utf8_reads() {
        let cases: &[&[u8]] = &[
            b"",
            b"x-api-key",
            b"/orders?q=1",
            "caf\u{e9}".as_bytes(),
            "\u{1f511}".as_bytes(),
            b"\x7f",
            b"\x80",
            b"ok\xff",
            b"\xc3",         // a truncated two-byte sequence
            b"\xed\xa0\x80", // a surrogate
        ];
        for &b in cases {
            assert_eq!(utf8(b), std::str::from_utf8(b).ok(), "{}", b.escape_ascii());
        }
        // Every single byte and every pair of bytes.
        for a in 0..=255u8 {
            assert_eq!(utf8(&[a]), std::str::from_utf8(&[a]).ok());
            for b in 0..=255u8 {
                assert_eq!(utf8(&[a, b]), std::str::from_utf8(&[a, b]).ok());
            }
        }
    }
}
