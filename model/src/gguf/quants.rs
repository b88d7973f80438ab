//! ggml tensor types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h`; each block starts with its scale(s) as f16
//! except Q2_K, Q3_K and Q6_K, which keep them at the end. Values are
//! computed in f32 with the same operation order as ggml's reference dequantizers, so the
//! results are bit-identical to `gguf.quants.dequantize` (checked by a committed fixture).

use half::{bf16, f16};

/// A ggml tensor type by its GGUF id. Every id ggml defines is named, so an unsupported
/// type can be reported by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Bf16,
    /// A type this crate can name but not dequantize (Q8_1 and Q8_K, which ggml uses for
    /// activations only; IQ*, TQ*, integer and MXFP4 types),
    /// or an id it does not know at all.
    Other(u32),
}

/// Names of ggml's type ids (`enum ggml_type`), for error messages.
const TYPE_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// Super-block size of the K-quants.
const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            other => Self::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Bf16 => 30,
            Self::Other(id) => id,
        }
    }

    /// ggml's name for the type (`Q4_K`, `IQ2_XS`, …), or `type <id>` for an unknown id.
    pub fn name(self) -> String {
        let id = self.id();
        TYPE_NAMES
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("type {id}"))
    }

    /// `(elements per block, bytes per block)`; `None` for types this crate cannot read.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
            Self::Other(_) => return None,
        })
    }

    /// Bytes that `elements` values of this type occupy, or why they cannot be stored.
    pub fn byte_size(self, elements: usize) -> Result<usize, String> {
        let (block, bytes) = self
            .block_layout()
            .ok_or_else(|| format!("quantization type {} is not supported", self.name()))?;
        if !elements.is_multiple_of(block) {
            return Err(format!(
                "{elements} elements is not a whole number of {} blocks of {block}",
                self.name()
            ));
        }
        (elements / block)
            .checked_mul(bytes)
            .ok_or_else(|| format!("{elements} elements of {} overflow the address space", self.name()))
    }
}

/// Dequantizes `data` (exactly [`GgmlType::byte_size`] bytes for `elements`) to f32.
pub fn dequantize(ty: GgmlType, data: &[u8], elements: usize) -> Result<Vec<f32>, String> {
    let expected = ty.byte_size(elements)?;
    if data.len() != expected {
        return Err(format!(
            "{} bytes for {elements} {} elements (expected {expected})",
            data.len(),
            ty.name()
        ));
    }
    let mut out = Vec::with_capacity(elements);
    match ty {
        GgmlType::F32 => out.extend(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Bf16 => out.extend(data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q4_0 => blocks(data, 18, &mut out, q4_0),
        GgmlType::Q4_1 => blocks(data, 20, &mut out, q4_1),
        GgmlType::Q5_0 => blocks(data, 22, &mut out, q5_0),
        GgmlType::Q5_1 => blocks(data, 24, &mut out, q5_1),
        GgmlType::Q8_0 => blocks(data, 34, &mut out, q8_0),
        GgmlType::Q2K => blocks(data, 84, &mut out, q2_k),
        GgmlType::Q3K => blocks(data, 110, &mut out, q3_k),
        GgmlType::Q4K => blocks(data, 144, &mut out, q4_k),
        GgmlType::Q5K => blocks(data, 176, &mut out, q5_k),
        GgmlType::Q6K => blocks(data, 210, &mut out, q6_k),
        GgmlType::Other(_) => return Err(format!("quantization type {} is not supported", ty.name())),
    }
    Ok(out)
}

fn blocks(data: &[u8], size: usize, out: &mut Vec<f32>, block: fn(&[u8], &mut Vec<f32>)) {
    for b in data.chunks_exact(size) {
        block(b, out);
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `{f16 d; u8 qs[16]}`: low nibbles are elements 0..16, high nibbles 16..32, offset by 8.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// `{f16 d; f16 m; u8 qs[16]}`: `q·d + m`.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// Bit `j` of the 32-bit `qh` is the fifth bit of element `j`.
fn fifth_bits(qh: &[u8]) -> u32 {
    u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]])
}

/// `{f16 d; u8 qh[4]; u8 qs[16]}`: 5-bit values offset by 16.
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qh = fifth_bits(&b[2..6]);
    let qs = &b[6..22];
    for (j, &q) in qs.iter().enumerate() {
        let hi = (((qh >> j) & 1) << 4) as u8;
        out.push((((q & 0x0F) | hi) as i32 - 16) as f32 * d);
    }
    for (j, &q) in qs.iter().enumerate() {
        let hi = (((qh >> (j + 16)) & 1) << 4) as u8;
        out.push((((q >> 4) | hi) as i32 - 16) as f32 * d);
    }
}

/// `{f16 d; f16 m; u8 qh[4]; u8 qs[16]}`: 5-bit values, `q·d + m`.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = fifth_bits(&b[4..8]);
    let qs = &b[8..24];
    for (j, &q) in qs.iter().enumerate() {
        let hi = (((qh >> j) & 1) << 4) as u8;
        out.push(((q & 0x0F) | hi) as f32 * d + m);
    }
    for (j, &q) in qs.iter().enumerate() {
        let hi = (((qh >> (j + 16)) & 1) << 4) as u8;
        out.push(((q >> 4) | hi) as f32 * d + m);
    }
}

/// `{f16 d; i8 qs[32]}`.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
}

/// `{u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}`: 2-bit values in 16 groups of 16, each
/// group with a 4-bit scale (low nibble) and 4-bit min (high nibble).
fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let scales = &b[0..16];
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    let mut group = 0;
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * (half + 1)];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[group];
                group += 1;
                let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                for &byte in &q[16 * part..16 * (part + 1)] {
                    out.push(dl * ((byte >> shift) & 3) as f32 - ml);
                }
            }
        }
    }
}

/// `{u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}`: 3-bit values (two low bits in `qs`,
/// the third in `hmask`, set meaning "no −4"), sixteen 6-bit scales offset by 32.
fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let hmask = &b[0..32];
    let d = half_at(b, 108);
    let scales = q3_k_scales(&b[96..108]);
    let mut group = 0;
    let mut bit = 0u32;
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * (half + 1)];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * (scales[group] as i32 - 32) as f32;
                group += 1;
                for l in 16 * part..16 * (part + 1) {
                    let low = ((q[l] >> shift) & 3) as i32;
                    let minus = if hmask[l] & (1 << bit) != 0 { 0 } else { 4 };
                    out.push(dl * (low - minus) as f32);
                }
            }
            bit += 1;
        }
    }
}

/// The sixteen 6-bit Q3_K scales: the low 4 bits of scale `i` are nibble `i` of bytes 0..8
/// (low nibbles for 0..8, high for 8..16); the top 2 bits are pair `i / 4`-th of byte `8 + i % 4`.
fn q3_k_scales(packed: &[u8]) -> [u8; 16] {
    let mut s = [0u8; 16];
    for (i, slot) in s.iter_mut().enumerate() {
        let low = if i < 8 { packed[i] & 0x0F } else { packed[i - 8] >> 4 };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *slot = low | (high << 4);
    }
    s
}

/// Scale and min `j` (0..8) of the 12 packed bytes of Q4_K/Q5_K: 6 bits each.
fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The (scale, min) pairs of the two 32-value groups of 64-value chunk `chunk` of a
/// Q4_K/Q5_K block: `d·scale` and `dmin·min`.
fn k4_chunk_scales(b: &[u8], chunk: usize) -> [(f32, f32); 2] {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    [2 * chunk, 2 * chunk + 1].map(|j| {
        let (s, m) = k4_scale_min(j, scales);
        (d * s as f32, dmin * m as f32)
    })
}

/// `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`: eight groups of 32 4-bit values.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    for chunk in 0..4 {
        let q = &b[16 + 32 * chunk..16 + 32 * (chunk + 1)];
        let [(d1, min1), (d2, min2)] = k4_chunk_scales(b, chunk);
        out.extend(q.iter().map(|&x| d1 * (x & 0x0F) as f32 - min1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - min2));
    }
}

/// `{f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`: Q4_K plus a fifth bit per value.
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let qh = &b[16..48];
    for chunk in 0..4 {
        let ql = &b[48 + 32 * chunk..48 + 32 * (chunk + 1)];
        let [(d1, min1), (d2, min2)] = k4_chunk_scales(b, chunk);
        let (bit1, bit2) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
        for (l, &x) in ql.iter().enumerate() {
            let hi = if qh[l] & bit1 != 0 { 16 } else { 0 };
            out.push(d1 * ((x & 0x0F) + hi) as f32 - min1);
        }
        for (l, &x) in ql.iter().enumerate() {
            let hi = if qh[l] & bit2 != 0 { 16 } else { 0 };
            out.push(d2 * ((x >> 4) + hi) as f32 - min2);
        }
    }
}

/// `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`: 6-bit values offset by 32, sixteen
/// groups of 16 with 8-bit signed scales.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[64 * half..64 * (half + 1)];
        let qh = &b[128 + 32 * half..128 + 32 * (half + 1)];
        let sc = &b[192 + 8 * half..192 + 8 * (half + 1)];
        let y = &mut y[128 * half..128 * (half + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| sc[is + k] as i8 as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(GgmlType::from_id(3).byte_size(64), Ok(40));
        assert_eq!(GgmlType::from_id(14).byte_size(512), Ok(420));
        assert!(GgmlType::Q4_0.byte_size(33).unwrap_err().contains("blocks of 32"));
        assert_eq!(GgmlType::from_id(16).name(), "IQ2_XXS");
        assert_eq!(GgmlType::from_id(999).name(), "type 999");
        assert!(GgmlType::from_id(20).byte_size(32).unwrap_err().contains("IQ4_NL"));
    }

    #[test]
    fn q8_0_and_q4_1_known_blocks() {
        // d = 0.5: q·d.
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for (i, q) in b[2..].iter_mut().enumerate() {
            *q = (i as i8 - 16) as u8;
        }
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
        // d = 1, m = -1: element j is the low nibble, j + 16 the high nibble.
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x52;
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!((y[0], y[16], y[1]), (1.0, 4.0, -1.0));
        assert!(dequantize(GgmlType::Q4_1, &b[..19], 32).is_err());
    }
}
