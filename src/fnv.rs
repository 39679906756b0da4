//! FNV-1a, for maps whose keys no client chooses: the router's (the
//! configuration's strings, only looked up per request) and the broker's per
//! stream entries (Envoy's context ids). Hashing a short key this way costs a
//! few instructions where SipHash costs a few dozen; SipHash stays wherever a
//! client's input becomes a key (per-caller copies, consent states).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub struct Fnv(u64);

impl Default for Fnv {
    /// FNV-1a 64's offset basis.
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn is_fnv_1a() {
        // The reference values of FNV-1a 64 (the empty string, "a", "foobar").
        let hash = |b: &[u8]| {
            let mut h = Fnv::default();
            h.write(b);
            h.finish()
        };
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
        let b = BuildHasherDefault::<Fnv>::default();
        assert_ne!(b.hash_one("/a"), b.hash_one("/b"));
    }
}
