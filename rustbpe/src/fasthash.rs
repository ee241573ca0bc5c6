//! Hashers for integer keys. The hot maps (pair counts while training; pair ranks and
//! short-token ranks while encoding) hash plain integers, where a general-purpose byte
//! hasher is wasted work: one 64x64->128 multiply, folded, is enough. The fold mixes the
//! high and low halves so hashbrown's bucket index (low bits) and tag (high bits) both
//! depend on all of the key.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xD6E8_FEB8_6659_FD93;

#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let m = a as u128 * b as u128;
    (m as u64) ^ ((m >> 64) as u64)
}

#[derive(Default, Clone, Copy)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    #[inline(always)]
    fn write(&mut self, _: &[u8]) {
        unreachable!("IntHasher only hashes u64 and u128 keys")
    }
    #[inline(always)]
    fn write_u64(&mut self, x: u64) {
        self.0 = fold_mul(x ^ self.0, K1);
    }
    #[inline(always)]
    fn write_u128(&mut self, x: u128) {
        self.0 = fold_mul((x as u64) ^ K1, ((x >> 64) as u64) ^ K2);
    }
    #[inline(always)]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Map keyed by a token pair packed as `left << 32 | right`.
pub type PairMap<V> = HashMap<u64, V, BuildHasherDefault<IntHasher>>;

/// Map keyed by a short byte string packed with `short_key`.
pub type ShortMap<V> = HashMap<u128, V, BuildHasherDefault<IntHasher>>;

/// Longest byte string `short_key` packs.
pub const SHORT_MAX: usize = 15;

/// Packs up to 15 bytes and their length into a u128, so looking up a short chunk is an
/// integer hash and compare instead of hashing and memcmp-ing a slice.
#[inline(always)]
pub fn short_key(b: &[u8]) -> u128 {
    debug_assert!(b.len() <= SHORT_MAX);
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    buf[15] = b.len() as u8;
    u128::from_le_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_distinct() {
        let keys = [
            &b""[..],
            b"\0",
            b"\0\0",
            b"a",
            b"a\0",
            b"ab",
            b"abcdefghijklmno",
            b"abcdefghijklmn",
        ];
        let set: std::collections::HashSet<u128> = keys.iter().map(|k| short_key(k)).collect();
        assert_eq!(set.len(), keys.len());
    }
}
