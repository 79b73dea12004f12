//! Bit damage for the corruption campaigns: which bits of a structure to flip.
//!
//! What it does: [`Flip::draw`] picks a site uniformly over every byte of a structure of a
//! given length (headers, lengths, checksums and payloads alike), then one of three damages
//! there: one bit, several bits of that byte, or a burst of 33 to 96 bits starting at a
//! random bit of the site (first and last bit flipped, the ones between at random, cut at the
//! structure's end). CRC32C catches every burst up to 32 bits by construction and longer ones
//! only with probability 1 - 2^-32, so long bursts are drawn on purpose. [`Flip::apply`]
//! XORs the damage into bytes.
//!
//! What it does not: choose the structure, apply itself anywhere, or judge whether the damage
//! was caught (the in-process campaign in `fuzzing::flips` and the engine's end-to-end one in
//! tests/tests/flips_e2e.rs do). Randomness comes in as a closure, so a caller's seeded
//! generator replays a damage.

use std::collections::BTreeMap;

/// One damage: the bits flipped, as byte offset -> XOR mask (never a zero mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    masks: BTreeMap<usize, u8>,
    /// From the first flipped bit to the last, inclusive: a burst's length.
    span_bits: usize,
}

impl Flip {
    /// A damage at a site drawn uniformly over `len` bytes, from the random words `next`
    /// yields. `len` 0 gives an empty damage.
    pub fn draw(next: &mut dyn FnMut() -> u64, len: usize) -> Self {
        // Uniform in 0..n (the modulo bias is below 2^-40 for these sizes); a remainder of a
        // `usize` fits one.
        let mut below = |n: usize| if n == 0 { 0 } else { usize::try_from(next() % n as u64).unwrap_or(0) };
        let mut masks = BTreeMap::new();
        if len > 0 {
            let site = below(len);
            match below(3) {
                0 => {
                    masks.insert(site, 1u8 << below(8));
                }
                1 => {
                    masks.insert(site, u8::try_from(below(255) + 1).unwrap_or(1));
                }
                _ => {
                    let burst_bits = 33 + below(64);
                    let first_bit = site * 8 + below(8);
                    for i in 0..burst_bits {
                        let bit = first_bit + i;
                        if bit / 8 >= len {
                            break;
                        }
                        let edge = i == 0 || i == burst_bits - 1;
                        if edge || below(2) == 1 {
                            *masks.entry(bit / 8).or_insert(0) ^= 1 << (bit % 8);
                        }
                    }
                }
            }
        }
        masks.retain(|_, mask| *mask != 0);
        let bit_at = |(at, mask): (&usize, &u8), last: bool| {
            at * 8 + if last { 7 - mask.leading_zeros() as usize } else { mask.trailing_zeros() as usize }
        };
        let span_bits = match (masks.iter().next(), masks.iter().next_back()) {
            (Some(first), Some(last)) => bit_at(last, true) + 1 - bit_at(first, false),
            _ => 0,
        };
        Self { masks, span_bits }
    }

    /// XORs the damage into `bytes`, its offsets counted from `base`; offsets past the end are
    /// left out.
    pub fn apply(&self, bytes: &mut [u8], base: usize) {
        for (at, mask) in &self.masks {
            if let Some(byte) = bytes.get_mut(base + at) {
                *byte ^= mask;
            }
        }
    }

    /// The first damaged byte's offset (0 for an empty damage).
    pub fn first(&self) -> usize {
        self.masks.keys().next().copied().unwrap_or(0)
    }

    /// Whether a damaged byte falls in `range`.
    pub fn touches(&self, range: std::ops::Range<usize>) -> bool {
        self.masks.keys().any(|at| range.contains(at))
    }

    /// From the first flipped bit to the last, inclusive (over 32: a burst CRC32C may miss).
    pub fn span_bits(&self) -> usize {
        self.span_bits
    }

    /// How many bits it flips.
    pub fn bits_count(&self) -> u32 {
        self.masks.values().map(|m| m.count_ones()).sum()
    }

    /// Whether it flips nothing.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn words(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = (state ^ (state >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn every_damage_changes_the_bytes_stays_inside_them_and_draws_long_bursts() {
        let mut next = words(7);
        let mut bursts = 0;
        for len in (1..300).chain([4096, 65_536]) {
            let flip = Flip::draw(&mut next, len);
            assert!(!flip.is_empty() && flip.bits_count() > 0, "len {len}: {flip:?}");
            let mut bytes = vec![0u8; len];
            flip.apply(&mut bytes, 0);
            assert_ne!(bytes, vec![0u8; len]);
            assert!(flip.touches(0..len) && flip.first() < len);
            bursts += usize::from(flip.span_bits() > 32);
        }
        assert!(bursts > 50, "{bursts} long bursts");
        assert!(Flip::draw(&mut next, 0).is_empty());
    }
}
