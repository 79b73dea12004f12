//! CRC32C of a concatenation from the CRCs of its parts, in about a microsecond.
//!
//! What it does: `combine(crc(a), crc(b), len(b)) == crc(a ++ b)`. Both ends build each file's
//! CRC from its chunks' CRCs this way (the source as it reads, the target as chunks verify), so
//! a file of N chunks costs N combines. The `crc32c` crate's own combine squares 32x32 GF(2)
//! matrices per call (about 55 us each, measured under `perf` as 3% of the target's CPU on a
//! 4 GiB shard of 1 MiB chunks); this one multiplies polynomials modulo the CRC32C polynomial,
//! as zlib 1.2.12 does for CRC-32: `crc(a ++ b) = crc(a) * x^(8 len(b)) mod P  xor  crc(b)`,
//! with `x^(8 len)` built from a table of `x^(2^k)` (about log2(len) products of 32 steps).
//! The init and final xor of CRC32C (both all ones) cancel out of that formula.
//!
//! What it does not: compute a CRC of bytes (the `crc32c` crate does, with the CPU's
//! instruction).

/// CRC32C's polynomial, bit-reflected (the representation its CRCs use).
const POLY_REFLECTED: u32 = 0x82F6_3B78;

/// `x^0` in the reflected representation.
const ONE: u32 = 1 << 31;

/// `x^(2^k) mod P` for k = 0..67: a length of `n` bytes is `8 n < 2^67` bits.
const X_POW_2K: [u32; 67] = x_pow_2k_table();

/// `a * b mod P`, both reflected.
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = ONE;
    let mut product = 0u32;
    loop {
        if a & m != 0 {
            product ^= b;
            if a & (m - 1) == 0 {
                return product;
            }
        }
        m >>= 1;
        if m == 0 {
            return product;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY_REFLECTED } else { b >> 1 };
    }
}

const fn x_pow_2k_table() -> [u32; 67] {
    let mut table = [0u32; 67];
    // x^1, reflected.
    table[0] = 1 << 30;
    let mut k = 1;
    while k < 67 {
        table[k] = mul_mod_p(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
}

/// `x^(8 n) mod P`: the factor that moves a CRC past `n` bytes.
fn x_pow_8n(n: u64) -> u32 {
    let mut power = ONE;
    // 8 n = n * 2^3: start at the table's entry for x^(2^3).
    let mut k = 3usize;
    let mut rest = n;
    while rest != 0 {
        if rest & 1 != 0 {
            // k < 3 + 64 while `rest` has bits left, so the table always has the entry.
            if let Some(&factor) = X_POW_2K.get(k) {
                power = mul_mod_p(factor, power);
            }
        }
        rest >>= 1;
        k += 1;
    }
    power
}

/// CRC32C of `a ++ b` from `crc(a)`, `crc(b)` and `len(b)` in bytes.
pub fn combine(crc_a: u32, crc_b: u32, len_b_bytes: u64) -> u32 {
    mul_mod_p(x_pow_8n(len_b_bytes), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn concatenations_match_the_crc_of_the_whole() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect();
        for split in [0, 1, 7, 64, 4095, 4096, 9_999, 10_000] {
            let (a, b) = bytes.split_at(split);
            let whole = crc32c::crc32c(&bytes);
            assert_eq!(combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64), whole, "split at {split}");
        }
    }

    #[test]
    fn an_empty_second_part_leaves_the_first_crc() {
        assert_eq!(combine(0xDEAD_BEEF, 0, 0), 0xDEAD_BEEF);
    }

    proptest! {
        #[test]
        fn agrees_with_the_crc32c_crate(a in any::<u32>(), b in any::<u32>(), len in 0u64..(1 << 40)) {
            let expected = crc32c::crc32c_combine(a, b, usize::try_from(len).unwrap_or(usize::MAX));
            prop_assert_eq!(combine(a, b, len), expected);
        }
    }
}
