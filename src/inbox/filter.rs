//! The filter of a window's sealed generations: a Bloom filter over their
//! keys, so an id that none of them holds is not looked up in the database
//! (docs/reliability.md, "The inbox").
//!
//! A filter never says no to a key it was given; it says maybe to about
//! 1 in 2,000 keys it was not. A maybe is looked up in the table, so a
//! wrong maybe costs one lookup and never a lost message.

/// Bits per key: 16 and [`HASHES`] probes give about 0.05 % wrong maybes.
const BITS_PER_KEY: u64 = 16;
/// Probes per key.
const HASHES: u32 = 11;

/// A Bloom filter over 16-byte keys that are already spread evenly (the
/// head of a SHA-256), so the key itself gives the probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    hashes: u32,
    bits: Vec<u64>,
}

impl Filter {
    /// An empty filter sized for `keys` keys.
    pub fn with_capacity(keys: u64) -> Filter {
        let words = (keys.max(1) * BITS_PER_KEY).div_ceil(64);
        Filter {
            hashes: HASHES,
            bits: vec![0; usize::try_from(words).unwrap_or(usize::MAX)],
        }
    }

    pub fn insert(&mut self, key: &[u8; 16]) {
        for bit in self.probes(key) {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
    }

    /// False only when `key` was never inserted.
    pub fn may_contain(&self, key: &[u8; 16]) -> bool {
        self.probes(key).all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// The bit of each probe: double hashing over the key's two halves.
    fn probes(&self, key: &[u8; 16]) -> impl Iterator<Item = usize> + use<> {
        let (low, high) = key.split_at(8);
        let first = u64::from_le_bytes(low.try_into().unwrap_or_default());
        let step = u64::from_le_bytes(high.try_into().unwrap_or_default()) | 1;
        let len = self.bits.len() as u64 * 64;
        (0..u64::from(self.hashes)).map(move |i| (first.wrapping_add(i.wrapping_mul(step)) % len) as usize)
    }

    /// The filter as stored: its probes per key and its bits.
    pub fn to_parts(&self) -> (i32, Vec<u8>) {
        let bytes = self.bits.iter().flat_map(|word| word.to_le_bytes()).collect();
        (i32::try_from(self.hashes).unwrap_or(i32::MAX), bytes)
    }

    /// A stored filter; `None` when the parts are not one.
    pub fn from_parts(hashes: i32, bytes: &[u8]) -> Option<Filter> {
        let hashes = u32::try_from(hashes).ok().filter(|h| *h > 0)?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
            return None;
        }
        let bits = bytes
            .chunks_exact(8)
            .map(|word| u64::from_le_bytes(word.try_into().unwrap_or_default()))
            .collect();
        Some(Filter { hashes, bits })
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn key(n: u64) -> [u8; 16] {
        let digest = Sha256::digest(n.to_le_bytes());
        digest[..16].try_into().unwrap()
    }

    #[test]
    fn every_inserted_key_is_a_maybe_and_few_others_are() {
        let mut filter = Filter::with_capacity(100_000);
        for n in 0..100_000 {
            filter.insert(&key(n));
        }
        assert!((0..100_000).all(|n| filter.may_contain(&key(n))));
        let wrong = (100_000..1_100_000).filter(|n| filter.may_contain(&key(*n))).count();
        // About 0.05 % expected: 500 of a million.
        assert!(wrong < 1_500, "{wrong} wrong maybes in a million");
        assert_eq!(filter.bytes(), 200_000, "2 bytes a key");
    }

    #[test]
    fn a_stored_filter_reads_back_the_same() {
        let mut filter = Filter::with_capacity(10);
        filter.insert(&key(1));
        let (hashes, bytes) = filter.to_parts();
        let read = Filter::from_parts(hashes, &bytes).unwrap();
        assert_eq!(read, filter);
        assert!(read.may_contain(&key(1)));
        assert_eq!(Filter::from_parts(hashes, &bytes[1..]), None);
        assert_eq!(Filter::from_parts(0, &bytes), None);
    }
}
