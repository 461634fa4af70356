//! Avro's binary encoding, the parts walrelay writes: zig-zag varints, length-prefixed bytes
//! and strings, little-endian floats, union branches, arrays in one block; and a decimal
//! string as the two's-complement big-endian unscaled integer that Avro's `decimal` carries.

/// Appends a `long` (also `int`, `boolean` is one byte): zig-zag, then a varint.
pub fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Appends `bytes` or `string`: the length, then the bytes.
pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    long(out, b.len() as i64);
    out.extend_from_slice(b);
}

/// Appends the branch index of a union.
pub fn branch(out: &mut Vec<u8>, index: i64) {
    long(out, index);
}

/// The unscaled integer of a decimal text (`-123.4500`, `7`, `0.5`) at `scale` digits after
/// the point, as Avro's `decimal` stores it: two's complement, big-endian, shortest form.
/// `None` when the text is not a plain decimal or has more fractional digits than `scale`
/// (which would lose digits).
pub fn decimal(text: &str, scale: u32) -> Option<Vec<u8>> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > scale as usize
    {
        return None;
    }
    // Little-endian 32-bit limbs: value = value * 10 + digit.
    let mut limbs: Vec<u32> = Vec::with_capacity(digits.len() / 9 + 1);
    let pad = scale as usize - frac.len();
    let all = int
        .bytes()
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', pad));
    for d in all {
        let mut carry = u64::from(d - b'0');
        for limb in &mut limbs {
            let v = u64::from(*limb) * 10 + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry > 0 {
            limbs.push(carry as u32);
        }
    }
    let mut be: Vec<u8> = limbs.iter().rev().flat_map(|l| l.to_be_bytes()).collect();
    if negative && limbs.iter().any(|&l| l != 0) {
        // Two's complement: invert and add one.
        for b in &mut be {
            *b = !*b;
        }
        for b in be.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
        be.insert(0, 0xff);
    } else {
        be.insert(0, 0);
    }
    // Shortest form: drop a leading byte that only repeats the sign of the next.
    let mut start = 0;
    while start + 1 < be.len() {
        let (b, next) = (be[start], be[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    be.drain(..start);
    Some(be)
}

/// The number of digits after the point of a decimal text (its scale as written).
pub fn scale_of(text: &str) -> u32 {
    text.split_once('.')
        .map_or(0, |(_, f)| u32::try_from(f.len()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn zigzag_varints_as_the_spec_lists_them() {
        for (v, expect) in [
            (0, "00"),
            (-1, "01"),
            (1, "02"),
            (-2, "03"),
            (2, "04"),
            (-64, "7f"),
            (64, "8001"),
        ] {
            let mut out = Vec::new();
            long(&mut out, v);
            assert_eq!(hex(&out), expect, "{v}");
        }
        let mut out = Vec::new();
        long(&mut out, i64::MIN);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn decimals_are_twos_complement_big_endian() {
        assert_eq!(decimal("1.50", 2).map(|b| hex(&b)), Some("0096".into()));
        assert_eq!(decimal("0", 0).map(|b| hex(&b)), Some("00".into()));
        assert_eq!(decimal("-1", 0).map(|b| hex(&b)), Some("ff".into()));
        assert_eq!(decimal("-128", 0).map(|b| hex(&b)), Some("80".into()));
        assert_eq!(decimal("127", 0).map(|b| hex(&b)), Some("7f".into()));
        assert_eq!(decimal("128", 0).map(|b| hex(&b)), Some("0080".into()));
        assert_eq!(decimal("-129", 0).map(|b| hex(&b)), Some("ff7f".into()));
        assert_eq!(decimal("-0.00", 2).map(|b| hex(&b)), Some("00".into()));
        // Padded to the scale.
        assert_eq!(decimal("1.5", 2), decimal("1.50", 2));
        assert_eq!(decimal("1.505", 2), None, "digits would be lost");
        assert_eq!(decimal("NaN", 2), None);
        assert_eq!(decimal("Infinity", 0), None);
        assert_eq!(decimal("", 0), None);
        assert_eq!(decimal("1e5", 0), None);
        // Larger than any machine integer: check against the i128 for one that fits.
        let text = "-12345678901234567890123456789.123456789";
        let n: i128 = -12_345_678_901_234_567_890_123_456_789_123_456_789;
        let b = decimal(text, 9).unwrap_or_default();
        let mut full = if n < 0 { vec![0xff; 16] } else { vec![0; 16] };
        let len = full.len();
        full[len - b.len()..].copy_from_slice(&b);
        let back = i128::from_be_bytes(full.try_into().unwrap_or([0; 16]));
        assert_eq!(back, n);
        assert_eq!(scale_of(text), 9);
    }
}
