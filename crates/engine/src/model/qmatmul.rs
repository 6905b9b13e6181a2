//! forgeline's CPU matmul for GGUF's common weight formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! the K-quants Q4_K, Q5_K and Q6_K (every type a Q4_K_M or Q5_K_M file holds).
//!
//! candle's dot products run one weight row against one input row (several of its types have
//! no SIMD version at all), and its matmul re-decodes each weight row for every input row, so
//! batched decode costs as much per row as single-stream decode. This kernel quantizes the
//! input rows to 8 bits once, and repacks the weights at load time into panels of 8 rows whose
//! blocks of 32 are interleaved four bytes at a time (as llama.cpp's AVX2 "repack" GEMMs do):
//! one 32-byte vector then holds four consecutive weights of each of the 8 rows, a
//! multiply-add against four input bytes broadcast to every lane yields the 8 rows' partial dot
//! products side by side, and the block's scaling, minimum term and final store are one vector
//! operation for 8 rows instead of 8 horizontal reductions. Each decoded weight vector serves
//! up to `C_MAX` input rows. AVX2 where the CPU has it, a portable loop over the same layout
//! otherwise. Work is split over candle's CPU thread pool.
//!
//! Every GGUF type becomes one of four panel layouts, as weight = d * q + m with an integer
//! `q` per weight and an f16 scale `d` and minimum `m` per block of 32 (two scales, one per 16,
//! for Q6_K):
//! - `Nib4` (Q4_0, Q4_1, Q4_K): 4-bit `q`; Q4_0's `- 8` is the minimum `-8 d`.
//! - `Nib5` (Q5_0, Q5_1, Q5_K): the same nibbles and a plane of fifth bits.
//! - `Byte8` (Q8_0): signed bytes.
//! - `Byte8Halves` (Q6_K): `q - 32` as signed bytes, a scale per 16.
//!
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are repacked exactly. A K-quant block's scale is its
//! super-block's f16 scale times a 6-bit (Q6_K: 8-bit) integer; that product is rounded to f16
//! (at most 2^-11 relative, far below the 8-bit rounding of the inputs). Results match
//! candle's own matmul up to these roundings and that of the input scale (f32 here, f16 in
//! candle).

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;

use super::qblocks::{decode, f16_at, gguf_block, QK};
use crate::memory::ForkExcluded;
use crate::simd::has_avx2;

/// Weight rows per panel: one f32 lane each in a 256-bit vector.
const PANEL: usize = 8;
/// Input rows per work item: keeps their quantized blocks in cache while panels stream.
const M_CHUNK: usize = 64;
/// Most input rows multiplied per pass over a panel block (accumulators stay in registers).
const C_MAX: usize = 4;

/// A panel layout. A panel block holds block `b` of each of the panel's 8 rows: the weights
/// (`QBYTES`), then the 8 rows' scales `d` as f16 (twice, for the two halves, when `HALVES`),
/// then for layouts with a minimum the 8 minimums `m` as f16.
trait PanelFormat {
    /// Bytes of the weights of one panel block.
    const QBYTES: usize;
    /// Whether blocks have a minimum `m` (else it is 0).
    const HAS_MIN: bool;
    /// Whether each half of a block (16 weights) has its own scale.
    const HALVES: bool = false;
    /// Bytes of one panel block.
    const PANEL_BYTES: usize =
        Self::QBYTES + 16 * (1 + Self::HALVES as usize + Self::HAS_MIN as usize);
    /// Whether this layout holds `q` (the range of its integers).
    fn fits(q: i32) -> bool;
    /// Writes weight `t` (0..32) of row `j` into a zeroed panel block.
    fn put(pb: &mut [u8], j: usize, t: usize, q: i32);
    /// Weight `t` of row `j` in a panel block.
    fn value(pb: &[u8], j: usize, t: usize) -> i32;
    /// For each of `C` input blocks, the 8 rows' integer dot products, one per i32 lane: over
    /// the whole block in `[0]`, or with `HALVES` over the first 16 weights in `[0]` and the
    /// last 16 in `[1]`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [[std::arch::x86_64::__m256i; C]; 2];
}

/// 4-bit `q` (0..16). Byte `32 i + 4 j + u` holds weight `4 i + u` of row `j` in its low nibble
/// and weight `4 (i + 4) + u` in its high nibble.
struct Nib4;
/// 5-bit `q` (0..32): `Nib4`'s nibbles, then 32 bytes of fifth bits laid out as the nibble
/// bytes: byte `128 + 4 j + u` holds in bit `i` the fifth bit of weight `4 i + u` of row `j`
/// and in bit `4 + i` that of weight `4 (i + 4) + u` (i < 4), so that one shift and one mask
/// move a group's bits to where they join its nibbles.
struct Nib5;
/// Signed 8-bit `q`. Byte `32 g + 4 j + u` is weight `4 g + u` of row `j`.
struct Byte8;
/// `Byte8` with a scale per 16 weights (groups 0..4 and 4..8).
struct Byte8Halves;

/// Four input bytes, from `4 g`, in every i32 lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn broadcast4(x: &Q8Block, g: usize) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_set1_epi32((x.q.as_ptr().add(4 * g) as *const i32).read_unaligned())
}

fn nib_place(j: usize, t: usize) -> (usize, u32) {
    let (g, u) = (t / 4, t % 4);
    (32 * (g % 4) + 4 * j + u, if g < 4 { 0 } else { 4 })
}

/// The bit of weight `t` of row `j` in `Nib5`'s plane of fifth bits: (byte, bit).
fn fifth_bit_place(j: usize, t: usize) -> (usize, u32) {
    let (g, u) = (t / 4, t % 4);
    (128 + 4 * j + u, g as u32)
}

impl PanelFormat for Nib4 {
    const QBYTES: usize = 128;
    const HAS_MIN: bool = true;

    fn fits(q: i32) -> bool {
        (0..16).contains(&q)
    }

    fn put(pb: &mut [u8], j: usize, t: usize, q: i32) {
        let (at, shift) = nib_place(j, t);
        pb[at] |= (q as u8) << shift;
    }

    fn value(pb: &[u8], j: usize, t: usize) -> i32 {
        let (at, shift) = nib_place(j, t);
        ((pb[at] >> shift) & 0x0F) as i32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [[std::arch::x86_64::__m256i; C]; 2] {
        use std::arch::x86_64::*;
        let mask = _mm256_set1_epi8(0x0F);
        // Nibble times signed byte, pairs summed: |p| <= 2 * 15 * 127, so the sum over the
        // block's 8 groups (<= 30480) fits the i16 lanes.
        let mut t = [_mm256_setzero_si256(); C];
        for i in 0..4 {
            let v = _mm256_loadu_si256(pb.add(32 * i) as *const __m256i);
            let lo = _mm256_and_si256(v, mask);
            for c in 0..C {
                t[c] = _mm256_add_epi16(t[c], _mm256_maddubs_epi16(lo, broadcast4(xs[c], i)));
            }
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            for c in 0..C {
                t[c] = _mm256_add_epi16(t[c], _mm256_maddubs_epi16(hi, broadcast4(xs[c], i + 4)));
            }
        }
        let ones = _mm256_set1_epi16(1);
        [
            t.map(|v| _mm256_madd_epi16(v, ones)),
            [_mm256_setzero_si256(); C],
        ]
    }
}

impl PanelFormat for Nib5 {
    const QBYTES: usize = 160;
    const HAS_MIN: bool = true;

    fn fits(q: i32) -> bool {
        (0..32).contains(&q)
    }

    fn put(pb: &mut [u8], j: usize, t: usize, q: i32) {
        Nib4::put(pb, j, t, q & 0x0F);
        let (at, bit) = fifth_bit_place(j, t);
        pb[at] |= ((q >> 4) as u8 & 1) << bit;
    }

    fn value(pb: &[u8], j: usize, t: usize) -> i32 {
        let (at, bit) = fifth_bit_place(j, t);
        Nib4::value(pb, j, t) | ((((pb[at] >> bit) & 1) as i32) << 4)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [[std::arch::x86_64::__m256i; C]; 2] {
        use std::arch::x86_64::*;
        let mask = _mm256_set1_epi8(0x0F);
        let fifth = _mm256_set1_epi8(0x10);
        let ones = _mm256_set1_epi16(1);
        let bits = _mm256_loadu_si256(pb.add(128) as *const __m256i);
        // Pairs reach 2 * 31 * 127 = 7874: four of them fit an i16 lane, so the sums widen to
        // i32 after every two vectors.
        let mut t = [_mm256_setzero_si256(); C];
        for half in 0..2 {
            let mut s = [_mm256_setzero_si256(); C];
            for i in 2 * half..2 * half + 2 {
                let v = _mm256_loadu_si256(pb.add(32 * i) as *const __m256i);
                // Bit i up to bit 4, bit 4 + i down to it: 16-bit shifts by at most 4 carry
                // no bit of one byte into bit 4 of the other.
                let up = _mm256_sll_epi16(bits, _mm_cvtsi32_si128(4 - i as i32));
                let lo = _mm256_or_si256(_mm256_and_si256(v, mask), _mm256_and_si256(up, fifth));
                for c in 0..C {
                    s[c] = _mm256_add_epi16(s[c], _mm256_maddubs_epi16(lo, broadcast4(xs[c], i)));
                }
                let down = _mm256_srl_epi16(bits, _mm_cvtsi32_si128(i as i32));
                let hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                    _mm256_and_si256(down, fifth),
                );
                for c in 0..C {
                    s[c] =
                        _mm256_add_epi16(s[c], _mm256_maddubs_epi16(hi, broadcast4(xs[c], i + 4)));
                }
            }
            for c in 0..C {
                t[c] = _mm256_add_epi32(t[c], _mm256_madd_epi16(s[c], ones));
            }
        }
        [t, [_mm256_setzero_si256(); C]]
    }
}

/// The dot products of signed-byte weights (`Byte8`'s layout) over groups `g0..g1` of 4.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn byte_dots<const C: usize>(
    pb: *const u8,
    xs: &[&Q8Block; C],
    groups: std::ops::Range<usize>,
) -> [std::arch::x86_64::__m256i; C] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut t = [_mm256_setzero_si256(); C];
    for g in groups {
        let w = _mm256_loadu_si256(pb.add(32 * g) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        for c in 0..C {
            // maddubs wants one unsigned operand: |w| times x with w's sign moved onto x.
            // Pairs reach 2 * 127 * 127, so each group widens to i32 at once.
            let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(broadcast4(xs[c], g), w));
            t[c] = _mm256_add_epi32(t[c], _mm256_madd_epi16(p, ones));
        }
    }
    t
}

fn byte_place(j: usize, t: usize) -> usize {
    32 * (t / 4) + 4 * j + t % 4
}

impl PanelFormat for Byte8 {
    const QBYTES: usize = 256;
    const HAS_MIN: bool = false;

    fn fits(q: i32) -> bool {
        (-128..128).contains(&q)
    }

    fn put(pb: &mut [u8], j: usize, t: usize, q: i32) {
        pb[byte_place(j, t)] = q as i8 as u8;
    }

    fn value(pb: &[u8], j: usize, t: usize) -> i32 {
        pb[byte_place(j, t)] as i8 as i32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [[std::arch::x86_64::__m256i; C]; 2] {
        [
            byte_dots::<C>(pb, xs, 0..8),
            [std::arch::x86_64::_mm256_setzero_si256(); C],
        ]
    }
}

impl PanelFormat for Byte8Halves {
    const QBYTES: usize = 256;
    const HAS_MIN: bool = false;
    const HALVES: bool = true;

    fn fits(q: i32) -> bool {
        Byte8::fits(q)
    }

    fn put(pb: &mut [u8], j: usize, t: usize, q: i32) {
        Byte8::put(pb, j, t, q)
    }

    fn value(pb: &[u8], j: usize, t: usize) -> i32 {
        Byte8::value(pb, j, t)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [[std::arch::x86_64::__m256i; C]; 2] {
        [byte_dots::<C>(pb, xs, 0..4), byte_dots::<C>(pb, xs, 4..8)]
    }
}

/// Whether this kernel multiplies by weights of this type.
pub fn supports(dtype: GgmlDType) -> bool {
    gguf_block(dtype).is_some()
}

/// Quantized weights this kernel multiplies by, repacked into panels of 8 rows.
pub struct QuantWeights {
    layout: PanelLayout,
    /// Declared before `panels`, so that it drops first.
    _fork: ForkExcluded,
    /// Panel `p`'s blocks, in order, then the next panel's. The last panel is padded with
    /// zero rows when `rows` is not a multiple of 8.
    panels: Vec<u8>,
    rows: usize,
    cols: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PanelLayout {
    Nib4,
    Nib5,
    Byte8,
    Byte8Halves,
}

impl PanelLayout {
    fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => PanelLayout::Nib4,
            GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => PanelLayout::Nib5,
            GgmlDType::Q8_0 => PanelLayout::Byte8,
            GgmlDType::Q6K => PanelLayout::Byte8Halves,
            _ => return None,
        })
    }
}

/// One quantized input block: x ≈ d * q, and s = d * Σq.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Q8Block {
    q: [i8; QK],
    d: f32,
    s: f32,
}

/// Why weights cannot be repacked.
#[derive(Debug)]
pub enum RepackError {
    /// The data's size does not fit the shape: a damaged file.
    Malformed(String),
    /// A scale does not fit an f16 (only absurd weights do): candle's matmul takes them.
    Unrepresentable,
}

impl QuantWeights {
    /// The weights, given as GGUF rows of a type `supports`.
    pub fn new(
        dtype: GgmlDType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Self, RepackError> {
        let layout = PanelLayout::of(dtype)
            .ok_or_else(|| RepackError::Malformed(format!("{dtype:?} is not repacked")))?;
        let panels = match layout {
            PanelLayout::Nib4 => repack::<Nib4>(dtype, data, rows, cols)?,
            PanelLayout::Nib5 => repack::<Nib5>(dtype, data, rows, cols)?,
            PanelLayout::Byte8 => repack::<Byte8>(dtype, data, rows, cols)?,
            PanelLayout::Byte8Halves => repack::<Byte8Halves>(dtype, data, rows, cols)?,
        };
        Ok(Self {
            layout,
            _fork: ForkExcluded::slice(&panels),
            panels,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// GGUF rows to panels (see `PanelFormat`).
fn repack<F: PanelFormat>(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> std::result::Result<Vec<u8>, RepackError> {
    let (block_bytes, block_len) = gguf_block(dtype)
        .ok_or_else(|| RepackError::Malformed(format!("{dtype:?} is not repacked")))?;
    let row_bytes = cols / block_len * block_bytes;
    if !cols.is_multiple_of(block_len)
        || rows == 0
        || rows.checked_mul(row_bytes) != Some(data.len())
    {
        return Err(RepackError::Malformed(format!(
            "{dtype:?} weight of {rows}x{cols} has a malformed size ({} bytes)",
            data.len()
        )));
    }
    let blocks = cols / QK;
    let n_panels = rows.div_ceil(PANEL);
    let mut out = vec![0u8; n_panels * blocks * F::PANEL_BYTES];
    let mut decoded = Vec::with_capacity(blocks);
    let to_f16 = |v: f32| {
        let h = f16::from_f32(v);
        if h.is_finite() {
            Ok(h.to_le_bytes())
        } else {
            Err(RepackError::Unrepresentable)
        }
    };
    for (p, panel) in out.chunks_exact_mut(blocks * F::PANEL_BYTES).enumerate() {
        for j in 0..PANEL.min(rows - p * PANEL) {
            let row = &data[(p * PANEL + j) * row_bytes..][..row_bytes];
            decoded.clear();
            for wb in row.chunks_exact(block_bytes) {
                decode(dtype, wb, &mut decoded);
            }
            for (blk, pb) in decoded.iter().zip(panel.chunks_exact_mut(F::PANEL_BYTES)) {
                for (t, &q) in blk.q.iter().enumerate() {
                    if !F::fits(q) {
                        return Err(RepackError::Malformed(format!(
                            "{dtype:?} weight value {q} out of range"
                        )));
                    }
                    F::put(pb, j, t, q);
                }
                let d = F::QBYTES + 2 * j;
                pb[d..d + 2].copy_from_slice(&to_f16(blk.d[0])?);
                if F::HALVES {
                    pb[d + 16..d + 18].copy_from_slice(&to_f16(blk.d[1])?);
                }
                if F::HAS_MIN {
                    let at = d + 16 * (1 + F::HALVES as usize);
                    pb[at..at + 2].copy_from_slice(&to_f16(blk.m)?);
                }
            }
        }
    }
    Ok(out)
}

fn quantize_rows(x: &[f32]) -> Vec<Q8Block> {
    let blocks = x.chunks_exact(QK);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 (checked above); every chunk has QK values.
        return blocks.map(|c| unsafe { quantize_block_avx2(c) }).collect();
    }
    blocks.map(quantize_block).collect()
}

/// 32 values as 8-bit integers times one scale (the largest magnitude maps to 127).
fn quantize_block(chunk: &[f32]) -> Q8Block {
    let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(chunk) {
        *qi = (v * inv).round_ties_even() as i8;
        sum += *qi as i32;
    }
    Q8Block {
        q,
        d,
        s: d * sum as f32,
    }
}

/// `quantize_block` in vector registers: it ran serially on one core for every matmul, a
/// tenth of the time of a batched decode step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(chunk: &[f32]) -> Q8Block {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(chunk.as_ptr().add(8 * i)));
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|v| _mm256_andnot_ps(sign, v));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    let amax = _mm_cvtss_f32(m);
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // Round to nearest (ties to even, as `quantize_block`), then narrow to bytes: the packs
    // interleave 128-bit lanes, which the final permute undoes.
    let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let sum = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let sum = _mm_hadd_epi32(sum, sum);
    let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(sum, sum));
    let w = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut q = [0i8; QK];
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, w);
    Q8Block {
        q,
        d,
        s: d * sum as f32,
    }
}

/// Results of one panel against up to `C_MAX` input rows: `out[c][j]` is input row `c` times
/// the panel's row `j`.
type Tile = [[f32; PANEL]; C_MAX];

/// One panel (its blocks, `panel`) times each of `xs` (≤ C_MAX input rows).
fn tile_portable<F: PanelFormat>(panel: &[u8], xs: &[&[Q8Block]], out: &mut Tile) {
    for (c, x) in xs.iter().enumerate() {
        out[c] = [0.0; PANEL];
        for (pb, xb) in panel.chunks_exact(F::PANEL_BYTES).zip(x.iter()) {
            for (j, o) in out[c].iter_mut().enumerate() {
                let dot = |ts: std::ops::Range<usize>| -> f32 {
                    ts.map(|t| F::value(pb, j, t) * xb.q[t] as i32).sum::<i32>() as f32
                };
                let d = f16_at(pb, F::QBYTES + 2 * j);
                if F::HALVES {
                    let d2 = f16_at(pb, F::QBYTES + 16 + 2 * j);
                    *o += xb.d * (d * dot(0..QK / 2) + d2 * dot(QK / 2..QK));
                } else {
                    *o += d * xb.d * dot(0..QK);
                }
                if F::HAS_MIN {
                    *o += f16_at(pb, F::QBYTES + 16 * (1 + F::HALVES as usize) + 2 * j) * xb.s;
                }
            }
        }
    }
}

/// One panel times `C` input rows, the `C` accumulators (8 rows each) in registers. `C` is a
/// constant so that the loops unroll (indexing accumulators by a runtime count spills them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<F: PanelFormat, const C: usize>(
    panel: &[u8],
    xs: &[&[Q8Block]],
    out: &mut Tile,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); C];
    let blocks = xs[0].len();
    let scale = |at: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i));
    for b in 0..blocks {
        let pb = panel.as_ptr().add(b * F::PANEL_BYTES);
        let xb: [&Q8Block; C] = std::array::from_fn(|c| xs.get_unchecked(c).get_unchecked(b));
        let [dots, dots2] = F::dots::<C>(pb, &xb);
        let d = scale(pb.add(F::QBYTES));
        for c in 0..C {
            let s = _mm256_mul_ps(d, _mm256_broadcast_ss(&xb[c].d));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[c]), s, acc[c]);
        }
        if F::HALVES {
            let d2 = scale(pb.add(F::QBYTES + 16));
            for c in 0..C {
                let s = _mm256_mul_ps(d2, _mm256_broadcast_ss(&xb[c].d));
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots2[c]), s, acc[c]);
            }
        }
        if F::HAS_MIN {
            let m = scale(pb.add(F::QBYTES + 16 * (1 + F::HALVES as usize)));
            for c in 0..C {
                acc[c] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(&xb[c].s), acc[c]);
            }
        }
    }
    for c in 0..C {
        _mm256_storeu_ps(out[c].as_mut_ptr(), acc[c]);
    }
}

fn tile<F: PanelFormat>(panel: &[u8], xs: &[&[Q8Block]], out: &mut Tile) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); every input row has as many
        // blocks as the panel.
        unsafe {
            match xs.len() {
                1 => return tile_avx2::<F, 1>(panel, xs, out),
                2 => return tile_avx2::<F, 2>(panel, xs, out),
                3 => return tile_avx2::<F, 3>(panel, xs, out),
                4 => return tile_avx2::<F, 4>(panel, xs, out),
                _ => {}
            }
        }
    }
    tile_portable::<F>(panel, xs, out)
}

/// `x` [m, cols] times the transposed weights: [m, rows].
pub fn matmul(w: &QuantWeights, x: &[f32], m: usize) -> Vec<f32> {
    match w.layout {
        PanelLayout::Nib4 => matmul_as::<Nib4>(w, x, m),
        PanelLayout::Nib5 => matmul_as::<Nib5>(w, x, m),
        PanelLayout::Byte8 => matmul_as::<Byte8>(w, x, m),
        PanelLayout::Byte8Halves => matmul_as::<Byte8Halves>(w, x, m),
    }
}

fn matmul_as<F: PanelFormat>(w: &QuantWeights, x: &[f32], m: usize) -> Vec<f32> {
    let (k, n) = (w.cols, w.rows);
    let xq = quantize_rows(x);
    let bpr = k / QK;
    let panel_len = bpr * F::PANEL_BYTES;
    let n_panels = n.div_ceil(PANEL);
    let mut dst = vec![0f32; m * n];
    let dst_ptr = dst.as_mut_ptr() as usize;
    let m_chunks = m.div_ceil(M_CHUNK);
    // One panel per work item; the pool hands them out in runs, balanced over the cores.
    candle_core::utils::barrier_pool().execute_chunked(m_chunks * n_panels, |items| {
        let mut out: Tile = [[0.0; PANEL]; C_MAX];
        for item in items {
            let (mc, p) = (item / n_panels, item % n_panels);
            let (m0, m1) = (mc * M_CHUNK, ((mc + 1) * M_CHUNK).min(m));
            let panel = &w.panels[p * panel_len..(p + 1) * panel_len];
            let (n0, n1) = (p * PANEL, ((p + 1) * PANEL).min(n));
            let mut r0 = m0;
            while r0 < m1 {
                let r1 = (r0 + C_MAX).min(m1);
                let xs: [&[Q8Block]; C_MAX] =
                    std::array::from_fn(|i| &xq[(r0 + i).min(r1 - 1) * bpr..][..bpr]);
                tile::<F>(panel, &xs[..r1 - r0], &mut out);
                for (c, r) in (r0..r1).enumerate() {
                    // SAFETY: each (row, col) is written by exactly one work item.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(
                            (dst_ptr as *mut f32).add(r * n + n0),
                            n1 - n0,
                        )
                    };
                    row.copy_from_slice(&out[c][..n1 - n0]);
                }
                r0 = r1;
            }
        }
    });
    dst
}

/// `x.apply_op1_no_bwd(&QuantMatMul(&w))`: [m, cols] f32 -> [m, rows] f32, on CPU.
pub struct QuantMatMul<'a>(pub &'a QuantWeights);

impl CustomOp1 for QuantMatMul<'_> {
    fn name(&self) -> &'static str {
        "forgeline-quant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("quantized matmul input must be contiguous")
        };
        let x = &s.as_slice::<f32>()?[a..b];
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.0.cols {
            candle_core::bail!(
                "quantized matmul: input has {k} columns, weights {}",
                self.0.cols
            )
        }
        let m = x.len() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty") = self.0.rows;
        Ok((CpuStorage::F32(matmul(self.0, x, m)), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Deterministic values in [-1, 1).
    fn pseudo_random(len: usize, seed: u64) -> Tensor {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, len, &Device::Cpu).unwrap()
    }

    const ALL: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    fn repacked(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (QuantWeights, QTensor) {
        let w = pseudo_random(n * k, seed).reshape((n, k)).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantWeights::new(dtype, &q.data().unwrap(), n, k).unwrap();
        (ours, q)
    }

    /// `x` [m, k] times the transposed `w` [n, k], in f64.
    fn exact_matmul(w: &[f32], x: &[f32], k: usize) -> Vec<f32> {
        x.chunks_exact(k)
            .flat_map(|xr| {
                w.chunks_exact(k).map(move |wr| {
                    wr.iter()
                        .zip(xr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>() as f32
                })
            })
            .collect()
    }

    fn flat(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn matches_the_dequantized_matmul_as_closely_as_candles_for_decode_and_prefill_shapes() {
        // 70 rows: the last panel is partial. 512 columns: two K-quant super-blocks. Both
        // kernels round the inputs to 8 bits (candle per 32 or, for K-quants, per 256), so both
        // are compared with the exact product of the dequantized weights: the largest error,
        // relative to the largest result, is small and no worse than about candle's.
        let (n, k) = (70, 512);
        for dtype in ALL {
            assert!(supports(dtype));
            let (ours, q) = repacked(dtype, n, k, 1);
            let wd = flat(q.dequantize(&Device::Cpu).unwrap());
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 2, 3, 4, 5, 7, 130] {
                let x = pseudo_random(m * k, m as u64 + 7).reshape((m, k)).unwrap();
                let want = exact_matmul(&wd, &flat(x.clone()), k);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let err = |got: &[f32]| {
                    got.iter()
                        .zip(&want)
                        .fold(0f32, |a, (g, w)| a.max((g - w).abs()))
                        / scale
                };
                let e_theirs = err(&flat(theirs.forward(&x).unwrap()));
                let e_ours = err(&flat(x.apply_op1_no_bwd(&QuantMatMul(&ours)).unwrap()));
                assert!(
                    e_ours < 5e-3 && e_ours < 2.0 * e_theirs.max(1e-3),
                    "{dtype:?} m={m}: error {e_ours} (candle's {e_theirs})"
                );
            }
        }
    }

    #[test]
    fn repacked_weights_are_the_dequantized_ones() {
        // Every weight read back from the panels (d * q + m) equals candle's dequantization:
        // exactly for the 32-blocks, up to the f16 rounding of the scales for K-quants.
        let (n, k) = (9, 256);
        for dtype in ALL {
            let (ours, q) = repacked(dtype, n, k, 5);
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = match ours.layout {
                PanelLayout::Nib4 => weights_of::<Nib4>(&ours),
                PanelLayout::Nib5 => weights_of::<Nib5>(&ours),
                PanelLayout::Byte8 => weights_of::<Byte8>(&ours),
                PanelLayout::Byte8Halves => weights_of::<Byte8Halves>(&ours),
            };
            let exact = matches!(
                dtype,
                GgmlDType::Q4_0
                    | GgmlDType::Q4_1
                    | GgmlDType::Q5_0
                    | GgmlDType::Q5_1
                    | GgmlDType::Q8_0
            );
            // A K-quant block's scale and minimum, rounded to f16 (2^-11 relative), move a
            // weight by at most 2^-11 of its size plus that of the minimum (within the range).
            let range = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = if exact {
                    1e-6 * (1e-3 + w.abs())
                } else {
                    (w.abs() + 2.0 * range) / 2048.0
                };
                assert!((g - w).abs() <= tol, "{dtype:?} [{i}]: {g} vs {w}");
            }
        }
    }

    /// The weights of repacked panels, row by row, as d * q + m.
    fn weights_of<F: PanelFormat>(w: &QuantWeights) -> Vec<f32> {
        let blocks = w.cols / QK;
        let mut out = Vec::with_capacity(w.rows * w.cols);
        for r in 0..w.rows {
            let (p, j) = (r / PANEL, r % PANEL);
            for b in 0..blocks {
                let pb = &w.panels[(p * blocks + b) * F::PANEL_BYTES..][..F::PANEL_BYTES];
                for t in 0..QK {
                    let half = if F::HALVES { t / 16 } else { 0 };
                    let d = f16_at(pb, F::QBYTES + 16 * half + 2 * j);
                    let m = if F::HAS_MIN {
                        f16_at(pb, F::QBYTES + 16 * (1 + F::HALVES as usize) + 2 * j)
                    } else {
                        0.0
                    };
                    out.push(d * F::value(pb, j, t) as f32 + m);
                }
            }
        }
        out
    }

    #[test]
    fn malformed_sizes_are_named() {
        for dtype in ALL {
            let (block_bytes, block_len) = gguf_block(dtype).unwrap();
            let data = vec![0u8; 2 * block_bytes - 1];
            let err = QuantWeights::new(dtype, &data, 1, 2 * block_len)
                .err()
                .unwrap();
            assert!(matches!(err, RepackError::Malformed(ref m) if m.contains("malformed size")));
        }
    }

    fn portable_and_simd_agree<F: PanelFormat>(dtype: GgmlDType) {
        let (n, k) = (8, 256);
        let (ours, _) = repacked(dtype, n, k, 3);
        assert_eq!(PanelLayout::of(dtype), Some(ours.layout));
        let x: Vec<f32> = (0..C_MAX * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let xq = quantize_rows(&x);
        let rows: Vec<&[Q8Block]> = xq.chunks(k / QK).collect();
        for c in 1..=C_MAX {
            let (mut a, mut b): (Tile, Tile) = Default::default();
            tile_portable::<F>(&ours.panels, &rows[..c], &mut a);
            tile::<F>(&ours.panels, &rows[..c], &mut b);
            for (i, (x, y)) in a[..c]
                .iter()
                .flatten()
                .zip(b[..c].iter().flatten())
                .enumerate()
            {
                assert!(
                    (x - y).abs() < 1e-3 * (1.0 + x.abs()),
                    "{dtype:?} {c} rows [{i}]: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn vector_quantization_matches_the_scalar_one() {
        let x: Vec<f32> = (0..8 * QK)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / (1.0 + (i % 5) as f32))
            .chain([0.0; QK])
            .collect();
        for (c, got) in x.chunks_exact(QK).zip(quantize_rows(&x)) {
            let want = quantize_block(c);
            assert_eq!(got.q, want.q);
            assert_eq!((got.d, got.s), (want.d, want.s));
        }
    }

    #[test]
    fn portable_and_simd_paths_agree() {
        portable_and_simd_agree::<Nib4>(GgmlDType::Q4_1);
        portable_and_simd_agree::<Nib4>(GgmlDType::Q4K);
        portable_and_simd_agree::<Nib5>(GgmlDType::Q5_0);
        portable_and_simd_agree::<Nib5>(GgmlDType::Q5K);
        portable_and_simd_agree::<Byte8>(GgmlDType::Q8_0);
        portable_and_simd_agree::<Byte8Halves>(GgmlDType::Q6K);
    }
}
