//! GGUF's quantized block formats decoded into blocks of 32 integers with their scale and
//! minimum (weight = d * q + m), the form `qmatmul` repacks into its panels: Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 (blocks of 32) and the K-quants Q4_K, Q5_K, Q6_K (super-blocks of 256), as
//! llama.cpp's `dequantize_row_*` read them.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Weights per block (and per GGUF block of the non-K types).
pub(crate) const QK: usize = 32;
/// Weights per K-quant super-block.
const QK_K: usize = 256;

/// One block of 32 weights of one row, decoded from GGUF: weight `t` = `d[t / 16] * q[t] + m`.
#[derive(Clone, Copy)]
pub(crate) struct Block {
    pub q: [i32; QK],
    /// The scale of the first and of the second 16 weights (equal but for Q6_K).
    pub d: [f32; 2],
    pub m: f32,
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// How a GGUF type is stored: bytes per block, weights per block (32, or 256 for K-quants).
pub(crate) fn gguf_block(dtype: GgmlDType) -> Option<(usize, usize)> {
    Some(match dtype {
        GgmlDType::Q4_0 => (18, QK),
        GgmlDType::Q4_1 => (20, QK),
        GgmlDType::Q5_0 => (22, QK),
        GgmlDType::Q5_1 => (24, QK),
        GgmlDType::Q8_0 => (34, QK),
        GgmlDType::Q4K => (144, QK_K),
        GgmlDType::Q5K => (176, QK_K),
        GgmlDType::Q6K => (210, QK_K),
        _ => return None,
    })
}

/// Q4_K's and Q5_K's 6-bit scale and minimum of sub-block `j` (llama.cpp's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (d as f32, m as f32)
}

/// One GGUF block (`wb`) as blocks of 32 (one, or eight for a K-quant super-block).
pub(crate) fn decode(dtype: GgmlDType, wb: &[u8], out: &mut Vec<Block>) {
    let nibbles = |qs: &[u8]| -> [i32; QK] {
        std::array::from_fn(|t| ((qs[t % 16] >> (4 * (t / 16))) & 0x0F) as i32)
    };
    let fifth = |qh: u32, t: usize| (((qh >> t) & 1) << 4) as i32;
    let one = |q, d: f32, m| Block { q, d: [d; 2], m };
    match dtype {
        GgmlDType::Q4_0 => {
            let d = f16_at(wb, 0);
            out.push(one(nibbles(&wb[2..18]), d, -8.0 * d));
        }
        GgmlDType::Q4_1 => out.push(one(nibbles(&wb[4..20]), f16_at(wb, 0), f16_at(wb, 2))),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let (d, m, at) = match dtype {
                GgmlDType::Q5_0 => (f16_at(wb, 0), -16.0 * f16_at(wb, 0), 2),
                _ => (f16_at(wb, 0), f16_at(wb, 2), 4),
            };
            let qh = u32::from_le_bytes([wb[at], wb[at + 1], wb[at + 2], wb[at + 3]]);
            let mut q = nibbles(&wb[at + 4..at + 20]);
            for (t, v) in q.iter_mut().enumerate() {
                *v |= fifth(qh, t);
            }
            out.push(one(q, d, m));
        }
        GgmlDType::Q8_0 => out.push(one(
            std::array::from_fn(|t| wb[2 + t] as i8 as i32),
            f16_at(wb, 0),
            0.0,
        )),
        GgmlDType::Q4K | GgmlDType::Q5K => {
            let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
            let scales = &wb[4..16];
            let (qh, qs) = match dtype {
                GgmlDType::Q4K => (None, &wb[16..144]),
                _ => (Some(&wb[16..48]), &wb[48..176]),
            };
            // Sub-blocks 2c and 2c + 1 are the low and high nibbles of bytes 32c..32c+32; in
            // Q5_K their fifth bits are bits 2c and 2c + 1 of qh[t].
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let (c, shift) = (j / 2, 4 * (j % 2));
                let q = std::array::from_fn(|t| {
                    let v = ((qs[32 * c + t] >> shift) & 0x0F) as i32;
                    v | qh.map_or(0, |qh| (((qh[t] >> j) & 1) << 4) as i32)
                });
                out.push(one(q, d * sc, -dmin * m));
            }
        }
        GgmlDType::Q6K => {
            let (ql, qh, sc) = (&wb[0..128], &wb[128..192], &wb[192..208]);
            let d = f16_at(wb, 208);
            // Weight 128 n + 32 k + l (k = 0..4) takes its low bits from ql[64 n + 32 (k % 2)
            // + l] (low nibble for k < 2) and its high bits from bits 2k of qh[32 n + l].
            let mut all = [0i32; QK_K];
            for (i, v) in all.iter_mut().enumerate() {
                let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
                let lo = (ql[64 * n + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
                let hi = (qh[32 * n + l] >> (2 * k)) & 3;
                *v = (lo | (hi << 4)) as i32 - 32;
            }
            for b in 0..8 {
                out.push(Block {
                    q: std::array::from_fn(|t| all[32 * b + t]),
                    d: [d * sc[2 * b] as i8 as f32, d * sc[2 * b + 1] as i8 as f32],
                    m: 0.0,
                });
            }
        }
        _ => unreachable!("decode of a type `gguf_block` refuses"),
    }
}
