//! forgeline's CPU matmul for Q4_1 and Q8_0 weights (the default model's formats).
//!
//! candle's Q4_1 dot product is its scalar fallback (no SIMD version exists for this type), and
//! its matmul re-decodes each weight row for every input row, so batched decode costs as much
//! per row as single-stream decode. This kernel quantizes the input rows to 8 bits once, and
//! repacks the weights at load time into panels of 8 rows whose blocks are interleaved four
//! bytes at a time (as llama.cpp's AVX2 "repack" GEMMs do): one 32-byte vector then holds four
//! consecutive weights of each of the 8 rows, a multiply-add against four input bytes broadcast
//! to every lane yields the 8 rows' partial dot products side by side, and the block's scaling,
//! minimum term and final store are one vector operation for 8 rows instead of 8 horizontal
//! reductions. Each decoded weight vector serves up to `C_MAX` input rows. AVX2 where the CPU
//! has it, a portable loop over the same layout otherwise. Work is split over candle's CPU
//! thread pool. Results match candle's own matmul up to the rounding of the activation scale
//! (f32 here, f16 in candle).

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;

use crate::memory::ForkExcluded;
use crate::simd::has_avx2;

/// Weights per GGUF block.
const QK: usize = 32;
/// Weight rows per panel: one f32 lane each in a 256-bit vector.
const PANEL: usize = 8;
/// Input rows per work item: keeps their quantized blocks in cache while panels stream.
const M_CHUNK: usize = 64;
/// Most input rows multiplied per pass over a panel block (accumulators stay in registers).
const C_MAX: usize = 4;

/// A GGUF block format and its panel layout. A panel block holds block `b` of each of the
/// panel's 8 rows: the weights (`QBYTES`), then the 8 scales `d` as f16, then for formats
/// with a minimum the 8 minimums `m` as f16; weight = d * q + m.
trait PanelFormat {
    /// Bytes of one GGUF block.
    const BYTES: usize;
    /// Bytes of the weights of one panel block.
    const QBYTES: usize;
    /// Whether blocks have a minimum `m` (else it is 0).
    const HAS_MIN: bool;
    /// Bytes of one panel block.
    const PANEL_BYTES: usize = Self::QBYTES + if Self::HAS_MIN { 32 } else { 16 };
    /// The 32 integer weights `q` of a GGUF block.
    fn values(wb: &[u8]) -> [i32; QK];
    /// Byte offset in a panel block of weight `t` (0..32) of row `j`, and the nibble shift
    /// for 4-bit formats.
    fn place(j: usize, t: usize) -> (usize, u32);
    /// Weight `t` of row `j` in a panel block.
    fn value(pb: &[u8], j: usize, t: usize) -> i32;
    /// For each of `C` input blocks, the 8 rows' integer dot products, one per i32 lane.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [std::arch::x86_64::__m256i; C];
}

/// f16 `d`, f16 `m`, 16 bytes of nibbles (element j low nibble of byte j, j+16 high nibble).
/// In a panel, byte `32 i + 4 j + u` holds weight `4 i + u` of row `j` in its low nibble and
/// weight `4 (i + 4) + u` in its high nibble.
struct Q4_1;
/// f16 `d`, 32 signed bytes. In a panel, byte `32 g + 4 j + u` is weight `4 g + u` of row `j`.
struct Q8_0;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Four input bytes, from `4 g`, in every i32 lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn broadcast4(x: &Q8Block, g: usize) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_set1_epi32((x.q.as_ptr().add(4 * g) as *const i32).read_unaligned())
}

impl PanelFormat for Q4_1 {
    const BYTES: usize = 20;
    const QBYTES: usize = 128;
    const HAS_MIN: bool = true;

    fn values(wb: &[u8]) -> [i32; QK] {
        let mut v = [0i32; QK];
        for j in 0..16 {
            v[j] = (wb[4 + j] & 0x0F) as i32;
            v[j + 16] = (wb[4 + j] >> 4) as i32;
        }
        v
    }

    fn place(j: usize, t: usize) -> (usize, u32) {
        let (g, u) = (t / 4, t % 4);
        (32 * (g % 4) + 4 * j + u, if g < 4 { 0 } else { 4 })
    }

    fn value(pb: &[u8], j: usize, t: usize) -> i32 {
        let (at, shift) = Self::place(j, t);
        ((pb[at] >> shift) & 0x0F) as i32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [std::arch::x86_64::__m256i; C] {
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
        t.map(|v| _mm256_madd_epi16(v, ones))
    }
}

impl PanelFormat for Q8_0 {
    const BYTES: usize = 34;
    const QBYTES: usize = 256;
    const HAS_MIN: bool = false;

    fn values(wb: &[u8]) -> [i32; QK] {
        std::array::from_fn(|j| wb[2 + j] as i8 as i32)
    }

    fn place(j: usize, t: usize) -> (usize, u32) {
        (32 * (t / 4) + 4 * j + t % 4, 0)
    }

    fn value(pb: &[u8], j: usize, t: usize) -> i32 {
        pb[Self::place(j, t).0] as i8 as i32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const C: usize>(
        pb: *const u8,
        xs: &[&Q8Block; C],
    ) -> [std::arch::x86_64::__m256i; C] {
        use std::arch::x86_64::*;
        let ones = _mm256_set1_epi16(1);
        let mut t = [_mm256_setzero_si256(); C];
        for g in 0..8 {
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
}

/// Quantized weights this kernel multiplies by, repacked into panels of 8 rows.
pub struct QuantWeights {
    dtype: GgmlDType,
    /// Declared before `panels`, so that it drops first.
    _fork: ForkExcluded,
    /// Panel `p`'s blocks, in order, then the next panel's. The last panel is padded with
    /// zero rows when `rows` is not a multiple of 8.
    panels: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// One quantized input block: x ≈ d * q, and s = d * Σq.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Q8Block {
    q: [i8; QK],
    d: f32,
    s: f32,
}

impl QuantWeights {
    /// The weights, given as GGUF rows, when this kernel handles their type (Q4_1, Q8_0) and
    /// their size is right.
    pub fn new(dtype: GgmlDType, data: Vec<u8>, rows: usize, cols: usize) -> Option<Self> {
        let panels = match dtype {
            GgmlDType::Q4_1 => repack::<Q4_1>(&data, rows, cols)?,
            GgmlDType::Q8_0 => repack::<Q8_0>(&data, rows, cols)?,
            _ => return None,
        };
        Some(Self {
            dtype,
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

/// GGUF rows to panels (see `PanelFormat`); `None` when the size does not fit the shape.
fn repack<F: PanelFormat>(data: &[u8], rows: usize, cols: usize) -> Option<Vec<u8>> {
    let blocks = cols / QK;
    if !cols.is_multiple_of(QK) || rows == 0 || data.len() != rows * blocks * F::BYTES {
        return None;
    }
    let n_panels = rows.div_ceil(PANEL);
    let mut out = vec![0u8; n_panels * blocks * F::PANEL_BYTES];
    for (p, panel) in out.chunks_exact_mut(blocks * F::PANEL_BYTES).enumerate() {
        for (b, pb) in panel.chunks_exact_mut(F::PANEL_BYTES).enumerate() {
            for j in 0..PANEL.min(rows - p * PANEL) {
                let at = ((p * PANEL + j) * blocks + b) * F::BYTES;
                let wb = &data[at..at + F::BYTES];
                for (t, v) in F::values(wb).into_iter().enumerate() {
                    let (at, shift) = F::place(j, t);
                    pb[at] |= (v as u8) << shift;
                }
                // The block's f16 scale (and minimum) are its first bytes in GGUF.
                let d = F::QBYTES + 2 * j;
                pb[d..d + 2].copy_from_slice(&wb[0..2]);
                if F::HAS_MIN {
                    pb[d + 16..d + 18].copy_from_slice(&wb[2..4]);
                }
            }
        }
    }
    Some(out)
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
                let dot: i32 = (0..QK).map(|t| F::value(pb, j, t) * xb.q[t] as i32).sum();
                let d = f16_at(pb, F::QBYTES + 2 * j);
                let m = if F::HAS_MIN {
                    f16_at(pb, F::QBYTES + 16 + 2 * j)
                } else {
                    0.0
                };
                *o += d * xb.d * dot as f32 + m * xb.s;
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
    for b in 0..blocks {
        let pb = panel.as_ptr().add(b * F::PANEL_BYTES);
        let xb: [&Q8Block; C] = std::array::from_fn(|c| xs.get_unchecked(c).get_unchecked(b));
        let dots = F::dots::<C>(pb, &xb);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(F::QBYTES) as *const __m128i));
        for c in 0..C {
            let scale = _mm256_mul_ps(d, _mm256_broadcast_ss(&xb[c].d));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[c]), scale, acc[c]);
        }
        if F::HAS_MIN {
            let m = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(F::QBYTES + 16) as *const __m128i));
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
    match w.dtype {
        GgmlDType::Q8_0 => matmul_as::<Q8_0>(w, x, m),
        _ => matmul_as::<Q4_1>(w, x, m),
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

    #[test]
    fn matches_candles_matmul_for_decode_and_prefill_shapes() {
        // 70 rows: the last panel is partial.
        let (n, k) = (70, 128);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = pseudo_random(n * k, 1).reshape((n, k)).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = QuantWeights::new(dtype, q.data().unwrap().into_owned(), n, k).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 2, 3, 4, 5, 7, 130] {
                let x = pseudo_random(m * k, m as u64 + 7).reshape((m, k)).unwrap();
                let want: Vec<f32> = theirs
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got: Vec<f32> = x
                    .apply_op1_no_bwd(&QuantMatMul(&ours))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 2e-2 * (1.0 + w.abs()),
                        "{dtype:?} m={m} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    fn portable_and_simd_agree<F: PanelFormat>(dtype: GgmlDType) {
        let (n, k) = (8, 64);
        let w = pseudo_random(n * k, 3).reshape((n, k)).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantWeights::new(dtype, q.data().unwrap().into_owned(), n, k).unwrap();
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
        portable_and_simd_agree::<Q4_1>(GgmlDType::Q4_1);
        portable_and_simd_agree::<Q8_0>(GgmlDType::Q8_0);
    }
}
