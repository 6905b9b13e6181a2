//! forgeline's CPU matmul for Q4_1 and Q8_0 weights (the default model's formats).
//!
//! candle's Q4_1 dot product is its scalar fallback (no SIMD version exists for this type), and
//! its matmul re-decodes each weight row for every input row, so batched decode costs as much
//! per row as single-stream decode. This kernel quantizes the input rows to 8 bits once and
//! computes tiles of up to 4 weight rows by 4 input rows with every accumulator in a register:
//! each weight block is decoded once per tile, each input block loaded once per tile. AVX2
//! integer multiply-adds where the CPU has them, a portable loop otherwise. Work is split over
//! candle's CPU thread pool. Results match candle's own matmul up to the rounding of the
//! activation scale (f32 here, f16 in candle).

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;

const QK: usize = 32;
/// Input rows per work item: keeps their quantized blocks in cache while weight rows stream.
const M_CHUNK: usize = 64;

/// How a block of 32 weights is stored (as GGUF stores it).
trait BlockFormat {
    const BYTES: usize;
    /// Scale and minimum of a block: weight = d * q + m.
    fn dm(wb: &[u8]) -> (f32, f32);
    /// The 32 integer weights `q`.
    fn values(wb: &[u8]) -> [i32; QK];
    /// The integer weights as a vector operand for `products`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(wb: *const u8) -> std::arch::x86_64::__m256i;
    /// Sums of adjacent products of weights and inputs, as 8 x i32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn products(
        w: std::arch::x86_64::__m256i,
        x: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i;
}

/// f16 `d`, f16 `m`, 16 bytes of nibbles (element j low nibble of byte j, j+16 high nibble).
struct Q4_1;
/// f16 `d`, 32 signed bytes.
struct Q8_0;

fn f16_at(wb: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([wb[at], wb[at + 1]]).to_f32()
}

impl BlockFormat for Q4_1 {
    const BYTES: usize = 20;

    #[inline(always)]
    fn dm(wb: &[u8]) -> (f32, f32) {
        (f16_at(wb, 0), f16_at(wb, 2))
    }

    fn values(wb: &[u8]) -> [i32; QK] {
        let mut v = [0i32; QK];
        for j in 0..16 {
            v[j] = (wb[4 + j] & 0x0F) as i32;
            v[j + 16] = (wb[4 + j] >> 4) as i32;
        }
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(wb: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let mask = _mm_set1_epi8(0x0F);
        let qs = _mm_loadu_si128(wb.add(4) as *const __m128i);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn products(
        w: std::arch::x86_64::__m256i,
        x: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // Unsigned nibbles times signed inputs: at most 2 * 15 * 127, no saturation.
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }
}

impl BlockFormat for Q8_0 {
    const BYTES: usize = 34;

    #[inline(always)]
    fn dm(wb: &[u8]) -> (f32, f32) {
        (f16_at(wb, 0), 0.0)
    }

    fn values(wb: &[u8]) -> [i32; QK] {
        std::array::from_fn(|j| wb[2 + j] as i8 as i32)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(wb: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        _mm256_loadu_si256(wb.add(2) as *const __m256i)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn products(
        w: std::arch::x86_64::__m256i,
        x: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // maddubs wants one unsigned operand: |w| times x with w's sign moved onto x.
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

/// Quantized weights this kernel multiplies by, rows of GGUF blocks.
pub struct QuantWeights {
    dtype: GgmlDType,
    data: Vec<u8>,
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
    /// The weights when this kernel handles their type (Q4_1, Q8_0) and their size is right.
    pub fn new(dtype: GgmlDType, data: Vec<u8>, rows: usize, cols: usize) -> Option<Self> {
        let bytes = match dtype {
            GgmlDType::Q4_1 => Q4_1::BYTES,
            GgmlDType::Q8_0 => Q8_0::BYTES,
            _ => return None,
        };
        (cols.is_multiple_of(QK) && data.len() == rows * cols / QK * bytes).then_some(Self {
            dtype,
            data,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    fn row(&self, r: usize) -> &[u8] {
        let len = self.data.len() / self.rows;
        &self.data[r * len..(r + 1) * len]
    }
}

fn quantize_rows(x: &[f32]) -> Vec<Q8Block> {
    let mut out = Vec::with_capacity(x.len() / QK);
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; QK];
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(chunk) {
            *qi = (v * inv).round() as i8;
            sum += *qi as i32;
        }
        out.push(Q8Block {
            q,
            d,
            s: d * sum as f32,
        });
    }
    out
}

/// Results of one tile: `out[r][c]` is weight row `r` times input row `c`.
type Tile = [[f32; TILE]; TILE];

/// Largest tile side, in weight rows and in input rows.
const TILE: usize = 4;

/// Dot products of each of `ws` (≤ TILE weight rows) with each of `xs` (≤ TILE input rows).
fn tile_portable<F: BlockFormat>(ws: &[&[u8]], xs: &[&[Q8Block]], out: &mut Tile) {
    for (r, w) in ws.iter().enumerate() {
        out[r] = [0.0; TILE];
        for (b, wb) in w.chunks_exact(F::BYTES).enumerate() {
            let (d, m) = F::dm(wb);
            let vals = F::values(wb);
            for (c, x) in xs.iter().enumerate() {
                let xb = &x[b];
                let dot: i32 = vals.iter().zip(&xb.q).map(|(a, b)| a * *b as i32).sum();
                out[r][c] += d * xb.d * dot as f32 + m * xb.s;
            }
        }
    }
}

/// `R` weight rows times `C` input rows with all `R * C` accumulators in registers: each
/// weight block is decoded once for `C` rows, each input block loaded once for `R` rows, and
/// the independent accumulators hide the multiply-add latency. `R` and `C` are constants so
/// that the loops unroll (indexing accumulators by a runtime count spills them to memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<F: BlockFormat, const R: usize, const C: usize>(
    ws: &[&[u8]],
    xs: &[&[Q8Block]],
    out: &mut Tile,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut mins = [[0f32; C]; R];
    let blocks = xs[0].len();
    for b in 0..blocks {
        let mut wq = [_mm256_setzero_si256(); R];
        let mut dm = [(0f32, 0f32); R];
        for r in 0..R {
            let wb = ws
                .get_unchecked(r)
                .get_unchecked(b * F::BYTES..(b + 1) * F::BYTES);
            dm[r] = F::dm(wb);
            wq[r] = F::load(wb.as_ptr());
        }
        for c in 0..C {
            let xb = xs.get_unchecked(c).get_unchecked(b);
            let xq = _mm256_load_si256(xb.q.as_ptr() as *const __m256i);
            for r in 0..R {
                let p = F::products(wq[r], xq);
                acc[r][c] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(p),
                    _mm256_set1_ps(dm[r].0 * xb.d),
                    acc[r][c],
                );
                mins[r][c] += dm[r].1 * xb.s;
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let v = acc[r][c];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            out[r][c] = _mm_cvtss_f32(s) + mins[r][c];
        }
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn tile<F: BlockFormat>(ws: &[&[u8]], xs: &[&[Q8Block]], out: &mut Tile) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); input blocks are 32-byte aligned;
        // every weight row has as many blocks as every input row.
        unsafe {
            match (ws.len(), xs.len()) {
                (1, 1) => return tile_avx2::<F, 1, 1>(ws, xs, out),
                (1, 2) => return tile_avx2::<F, 1, 2>(ws, xs, out),
                (1, 3) => return tile_avx2::<F, 1, 3>(ws, xs, out),
                (1, 4) => return tile_avx2::<F, 1, 4>(ws, xs, out),
                (2, 1) => return tile_avx2::<F, 2, 1>(ws, xs, out),
                (2, 2) => return tile_avx2::<F, 2, 2>(ws, xs, out),
                (2, 3) => return tile_avx2::<F, 2, 3>(ws, xs, out),
                (2, 4) => return tile_avx2::<F, 2, 4>(ws, xs, out),
                (3, 1) => return tile_avx2::<F, 3, 1>(ws, xs, out),
                (3, 2) => return tile_avx2::<F, 3, 2>(ws, xs, out),
                (4, 1) => return tile_avx2::<F, 4, 1>(ws, xs, out),
                (4, 2) => return tile_avx2::<F, 4, 2>(ws, xs, out),
                // Shapes `tile_shape` never asks for would not fit the registers.
                _ => {}
            }
        }
    }
    tile_portable::<F>(ws, xs, out)
}

/// Tile shape (weight rows, input rows) for `m` input rows; at most 8 accumulators.
fn tile_shape(m: usize) -> (usize, usize) {
    match m {
        1 => (2, 1),
        2 | 3 => (4, 2),
        _ => (2, 4),
    }
}

/// `x` [m, cols] times the transposed weights: [m, rows].
pub fn matmul(w: &QuantWeights, x: &[f32], m: usize) -> Vec<f32> {
    match w.dtype {
        GgmlDType::Q8_0 => matmul_as::<Q8_0>(w, x, m),
        _ => matmul_as::<Q4_1>(w, x, m),
    }
}

fn matmul_as<F: BlockFormat>(w: &QuantWeights, x: &[f32], m: usize) -> Vec<f32> {
    let (k, n) = (w.cols, w.rows);
    let xq = quantize_rows(x);
    let bpr = k / QK;
    let mut dst = vec![0f32; m * n];
    let dst_ptr = dst.as_mut_ptr() as usize;
    let m_chunks = m.div_ceil(M_CHUNK);
    // Weight rows per work item: enough to amortise scheduling, small enough to balance.
    let n_chunk = if m == 1 { 16 } else { 64 };
    let n_chunks = n.div_ceil(n_chunk);
    let (tr, tc) = tile_shape(m);
    candle_core::utils::barrier_pool().execute_chunked(m_chunks * n_chunks, |items| {
        let mut out: Tile = [[0.0; TILE]; TILE];
        for item in items {
            let (mc, nc) = (item / n_chunks, item % n_chunks);
            let (m0, m1) = (mc * M_CHUNK, ((mc + 1) * M_CHUNK).min(m));
            let (n0, n1) = (nc * n_chunk, ((nc + 1) * n_chunk).min(n));
            let mut c0 = n0;
            while c0 < n1 {
                let c1 = (c0 + tr).min(n1);
                let ws: [&[u8]; TILE] = std::array::from_fn(|i| w.row((c0 + i).min(c1 - 1)));
                let mut r0 = m0;
                while r0 < m1 {
                    let r1 = (r0 + tc).min(m1);
                    let xs: [&[Q8Block]; TILE] =
                        std::array::from_fn(|i| &xq[(r0 + i).min(r1 - 1) * bpr..][..bpr]);
                    tile::<F>(&ws[..c1 - c0], &xs[..r1 - r0], &mut out);
                    for (i, r) in (r0..r1).enumerate() {
                        for (j, col) in (c0..c1).enumerate() {
                            // SAFETY: each (row, col) is written by exactly one work item.
                            unsafe { *(dst_ptr as *mut f32).add(r * n + col) = out[j][i] };
                        }
                    }
                    r0 = r1;
                }
                c0 = c1;
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
        let (n, k) = (72, 128);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = pseudo_random(n * k, 1).reshape((n, k)).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = QuantWeights::new(dtype, q.data().unwrap().into_owned(), n, k).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 2, 3, 4, 7, 130] {
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

    fn portable_and_simd_agree<F: BlockFormat>(dtype: GgmlDType) {
        let (n, k) = (8, 64);
        let w = pseudo_random(n * k, 3).reshape((n, k)).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantWeights::new(dtype, q.data().unwrap().into_owned(), n, k).unwrap();
        let x: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let xq = quantize_rows(&x);
        let rows: Vec<&[Q8Block]> = xq.chunks(k / QK).collect();
        for (tr, tc) in [(1, 1), (1, 4), (2, 3), (2, 4), (3, 2), (4, 1), (4, 2)] {
            let ws: Vec<&[u8]> = (0..tr).map(|r| ours.row(r)).collect();
            let (mut a, mut b): (Tile, Tile) = Default::default();
            tile_portable::<F>(&ws, &rows[..tc], &mut a);
            tile::<F>(&ws, &rows[..tc], &mut b);
            for r in 0..tr {
                for c in 0..tc {
                    let (x, y) = (a[r][c], b[r][c]);
                    assert!(
                        (x - y).abs() < 1e-3 * (1.0 + x.abs()),
                        "{dtype:?} {tr}x{tc} [{r}][{c}]: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn portable_and_simd_paths_agree() {
        portable_and_simd_agree::<Q4_1>(GgmlDType::Q4_1);
        portable_and_simd_agree::<Q8_0>(GgmlDType::Q8_0);
    }
}
