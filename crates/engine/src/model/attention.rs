//! Attention over the paged KV cache, for a batch that mixes sequences of different lengths.
//!
//! The rotary table both implementations use, and the fused CPU one: two kernels (write
//! rotated K and V into their slots; attend each query to its own sequence's slots),
//! parallel over (group of query tiles, KV head) on candle's CPU thread pool; the batch's
//! layout and its tile groups are in `batch`. One op per step instead
//! of a dozen small ones: on a small model, per-op overhead is most of the time. The other
//! implementation, candle tensor ops on any device, is `generic_attention`.

use candle_core::{CpuStorage, CustomOp2, InplaceOp2, Layout, Shape};
use half::slice::HalfFloatSliceExt;

use crate::model::batch::{BatchLayout, TileGroup};
use crate::model::ModelConfig;

/// cos/sin of the rotary embedding per position: [positions, head_dim / 2].
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    pub fn new(cfg: &ModelConfig, positions: usize) -> Self {
        Self::from_inv_freq(&cfg.rope_inv_freq(), positions)
    }

    /// The table of these inverse frequencies, one per pair of dimensions.
    pub fn from_inv_freq(inv: &[f32], positions: usize) -> Self {
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates `x` (one head, non-interleaved halves) to position `pos`, into `out`.
    #[inline]
    fn rotate(&self, x: &[f32], pos: usize, out: &mut [f32]) {
        let h = self.half;
        let (c, s) = (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        );
        for i in 0..h {
            let (x0, x1) = (x[i], x[i + h]);
            out[i] = x0 * c[i] - x1 * s[i];
            out[i + h] = x0 * s[i] + x1 * c[i];
        }
    }

    /// `x` (one head) through `norm` when there is one, then rotated to `pos`, into `out`.
    #[inline]
    fn prepare(&self, x: &[f32], norm: Option<HeadNorm>, pos: usize, out: &mut [f32]) {
        let Some(n) = norm else {
            return self.rotate(x, pos, out);
        };
        n.apply(x, out);
        let h = self.half;
        let (c, s) = (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        );
        for i in 0..h {
            let (x0, x1) = (out[i], out[i + h]);
            out[i] = x0 * c[i] - x1 * s[i];
            out[i + h] = x0 * s[i] + x1 * c[i];
        }
    }
}

/// qwen3's RMS norms over each head of q and of k, applied before the rotary embedding: the
/// weights as tensors (for the generic path, on the model's device) and as host floats (for
/// the fused CPU kernels, which apply them as they rotate).
pub struct QkNorm {
    pub q: candle_core::Tensor,
    pub k: candle_core::Tensor,
    q_host: Vec<f32>,
    k_host: Vec<f32>,
    pub eps: f32,
}

impl QkNorm {
    pub fn new(
        q: candle_core::Tensor,
        k: candle_core::Tensor,
        eps: f32,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            q_host: q.to_vec1()?,
            k_host: k.to_vec1()?,
            q,
            k,
            eps,
        })
    }

    fn q(&self) -> HeadNorm<'_> {
        HeadNorm {
            w: &self.q_host,
            eps: self.eps,
        }
    }

    fn k(&self) -> HeadNorm<'_> {
        HeadNorm {
            w: &self.k_host,
            eps: self.eps,
        }
    }
}

/// One head's RMS norm.
#[derive(Clone, Copy)]
struct HeadNorm<'a> {
    w: &'a [f32],
    eps: f32,
}

impl HeadNorm<'_> {
    /// `out = x / sqrt(mean(x^2) + eps) * w`, computed as candle's `rms_norm` computes it.
    #[inline]
    fn apply(self, x: &[f32], out: &mut [f32]) {
        let sum2: f32 = x.iter().map(|v| v * v).sum();
        let m = (sum2 / x.len() as f32 + self.eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(self.w) {
            *o = v / m * w;
        }
    }
}

/// What the KV cache stores: f32, or f16 (converted a row at a time, with F16C where the CPU
/// has it).
trait KvElem: Copy + Send + Sync {
    fn load(src: &[Self], dst: &mut [f32]);
    fn store(dst: &mut [Self], src: &[f32]);
}

impl KvElem for f32 {
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src)
    }
}

impl KvElem for half::f16 {
    #[inline]
    fn load(src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if src.len().is_multiple_of(8) && dst.len() == src.len() && has_f16c() {
            // SAFETY: the CPU has F16C (checked); both slices hold `src.len()` elements.
            return unsafe { load_f16c(src, dst) };
        }
        src.convert_to_f32_slice(dst)
    }
    fn store(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src)
    }
}

/// `half`'s slice conversion checks the CPU and splits the slice on every call, which
/// for one 64-element row costs as much as the conversion.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn load_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i));
        _mm256_storeu_ps(d.as_mut_ptr(), v);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F16C.get_or_init(|| is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c"))
}

/// The cache's elements from `off`, by type.
fn cache_mut<'a>(s: &'a mut CpuStorage, off: usize) -> candle_core::Result<CacheMut<'a>> {
    Ok(match s {
        CpuStorage::F32(v) => CacheMut::F32(&mut v[off..]),
        CpuStorage::F16(v) => CacheMut::F16(&mut v[off..]),
        _ => candle_core::bail!("kv cache must be f32 or f16"),
    })
}

enum CacheMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [half::f16]),
}

/// Head geometry shared by both implementations.
#[derive(Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    pub fn qkv_width(&self) -> usize {
        (self.q + 2 * self.kv) * self.dim
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Writes the rotated K and the V of every token of `qkv` [T, qkv_width] into its slot of
/// the layer's cache [slots, 2, kv_heads, head_dim].
pub struct WriteKv<'a> {
    pub heads: Heads,
    pub batch: &'a BatchLayout,
    pub rope: &'a RopeTable,
    /// Norms each K head before rotating it (qwen3).
    pub norm: Option<&'a QkNorm>,
}

impl WriteKv<'_> {
    fn write<E: KvElem>(&self, qkv: &[f32], cache: &mut [E]) -> candle_core::Result<()> {
        let Heads { q, kv, dim } = self.heads;
        let w = self.heads.qkv_width();
        let slot_len = 2 * kv * dim;
        let mut rotated = vec![0f32; dim];
        for (t, (&slot, &pos)) in self
            .batch
            .write_slots
            .iter()
            .zip(&self.batch.positions)
            .enumerate()
        {
            let row = &qkv[t * w..(t + 1) * w];
            let dst = &mut cache[slot as usize * slot_len..(slot as usize + 1) * slot_len];
            let (k_dst, v_dst) = dst.split_at_mut(kv * dim);
            for g in 0..kv {
                let k = &row[(q + g) * dim..(q + g + 1) * dim];
                self.rope
                    .prepare(k, self.norm.map(QkNorm::k), pos as usize, &mut rotated);
                E::store(&mut k_dst[g * dim..(g + 1) * dim], &rotated);
            }
            E::store(v_dst, &row[(q + kv) * dim..(q + 2 * kv) * dim]);
        }
        Ok(())
    }
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "forgeline-write-kv"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let qkv = f32_slice(src, src_l, "qkv")?;
        let Some((off, _)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("kv cache must be contiguous")
        };
        match cache_mut(dst, off)? {
            CacheMut::F32(c) => self.write(qkv, c),
            CacheMut::F16(c) => self.write(qkv, c),
        }
    }
}

/// Attention of every query of `qkv` [T, qkv_width] over its own sequence's cached positions
/// up to its own; returns [T, q_heads * head_dim].
pub struct PagedAttention<'a> {
    pub heads: Heads,
    pub batch: &'a BatchLayout,
    pub rope: &'a RopeTable,
    /// Norms each query head before rotating it (qwen3, gemma3).
    pub norm: Option<&'a QkNorm>,
    /// What scores are scaled by (1/sqrt(head size), or the model's own).
    pub scale: f32,
    /// Positions each query sees, its own included (Gemma 3's sliding layers); None: all
    /// before it.
    pub window: Option<usize>,
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes so that the compiler emits one vector FMA per step.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Positions whose K (then V) rows are converted into one buffer and used by every query of
/// a work item before the next chunk: 32 rows of 64 f32 are 8 KiB, well inside L1.
const KEY_CHUNK: usize = 32;

/// One tile of a work item: the slots its queries see and the range of its queries in the
/// item.
struct Member<'a> {
    slots: &'a [u32],
    queries: std::ops::Range<usize>,
}

/// One work item: the queries of a group of tiles (rotated, `n_q` rows of `dim`) for one KV
/// head, the tiles' cache slots, and where that head's K and V sit in a slot.
struct Item<'a, E> {
    cache: &'a [E],
    members: &'a [Member<'a>],
    /// Leading positions all members' slots share (see `TileGroup`).
    shared: usize,
    slot_len: usize,
    k_off: usize,
    v_off: usize,
    dim: usize,
    /// For each query, how many positions it sees (its own position + 1).
    visible: &'a [usize],
    /// Of those, how many at the end count: the positions before them get no weight (a
    /// sliding window); usize::MAX counts all.
    window: usize,
    queries: &'a [f32],
}

/// A thread's scratch space, kept and grown as needed: nothing in it is read before the
/// work item using it wrote it.
#[derive(Default)]
struct Scratch {
    /// The item's rotated queries, and how many positions each sees.
    queries: Vec<f32>,
    visible: Vec<usize>,
    work: Work,
}

/// What the kernels compute into.
#[derive(Default)]
struct Work {
    /// Per query, scores over the positions, then (in place) their softmax weights.
    scores: Vec<f32>,
    stride: usize,
    rows: Vec<f32>,
    acc: Vec<f32>,
}

impl Scratch {
    fn fit(&mut self, queries: usize, max_ctx: usize, dim: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0)
            }
        };
        let w = &mut self.work;
        // Scores are written eight positions at a time.
        w.stride = max_ctx.next_multiple_of(8);
        grow(&mut w.scores, queries * w.stride);
        grow(&mut w.rows, KEY_CHUNK * dim);
        grow(&mut w.acc, queries * dim);
        grow(&mut self.queries, queries * dim);
        if self.visible.len() < queries {
            self.visible.resize(queries, 0);
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl<E: KvElem> Item<'_, E> {
    /// Converts the K (`off` = k_off) or V rows of `slots[c0..c0 + n]` into `rows`.
    fn load_rows(&self, slots: &[u32], off: usize, c0: usize, n: usize, rows: &mut [f32]) {
        let dim = self.dim;
        for (r, &slot) in rows.chunks_exact_mut(dim).zip(&slots[c0..c0 + n]) {
            let base = slot as usize * self.slot_len + off;
            E::load(&self.cache[base..base + dim], r);
        }
    }

    /// The spans of positions a pass visits, `KEY_CHUNK` rows at a time: the shared
    /// prefix once for every query of the item, then each member's own positions for its
    /// own queries. Calls `f(slots, first position, rows, queries)`.
    fn spans(&self, mut f: impl FnMut(&[u32], usize, usize, std::ops::Range<usize>)) {
        let all = 0..self.visible.len();
        let mut c0 = 0;
        while c0 < self.shared {
            let n = KEY_CHUNK.min(self.shared - c0);
            f(self.members[0].slots, c0, n, all.clone());
            c0 += n;
        }
        for m in self.members {
            let mut c0 = self.shared;
            while c0 < m.slots.len() {
                let n = KEY_CHUNK.min(m.slots.len() - c0);
                f(m.slots, c0, n, m.queries.clone());
                c0 += n;
            }
        }
    }

    /// The two passes every kernel makes over the positions (see `spans`):
    /// `score(query, rows, seen, out)` writes the query's scores against the first `seen`
    /// rows into `out`, `softmax` turns each query's scores into weights, and
    /// `add(acc, weights, rows)` adds the weighted V rows into a query's output. Every
    /// query meets its positions in order, so a group computes exactly what its tiles
    /// would one by one.
    fn passes(
        &self,
        s: &mut Work,
        mut score: impl FnMut(&[f32], &[f32], usize, &mut [f32]),
        softmax: impl Fn(&mut [f32]),
        mut add: impl FnMut(&mut [f32], &[f32], &[f32]),
    ) {
        let dim = self.dim;
        let n_q = self.visible.len();
        let (stride, scores, rows) = (s.stride, &mut s.scores, &mut s.rows);
        self.spans(|slots, c0, n, qs| {
            self.load_rows(slots, self.k_off, c0, n, rows);
            // Kernels that score eight positions at a time read rows past `n`: zeros, whose
            // scores are not used.
            rows[n * dim..n.next_multiple_of(8) * dim].fill(0.0);
            for i in qs {
                let seen = self.visible[i].saturating_sub(c0).min(n);
                let q = &self.queries[i * dim..(i + 1) * dim];
                score(
                    q,
                    rows,
                    seen,
                    &mut scores[i * stride + c0..(i + 1) * stride],
                );
            }
        });
        for i in 0..n_q {
            let row = &mut scores[i * stride..i * stride + self.visible[i]];
            // Outside the window: weight 0 (its rows are still read, and added times 0).
            let from = self.visible[i].saturating_sub(self.window);
            row[..from].fill(0.0);
            softmax(&mut row[from..]);
        }
        let acc = &mut s.acc;
        acc[..n_q * dim].fill(0.0);
        self.spans(|slots, c0, n, qs| {
            self.load_rows(slots, self.v_off, c0, n, rows);
            for i in qs {
                let seen = self.visible[i].saturating_sub(c0).min(n);
                let p = &scores[i * stride + c0..i * stride + c0 + seen];
                add(&mut acc[i * dim..(i + 1) * dim], p, &rows[..seen * dim]);
            }
        });
    }

    /// Portable: one dot product per (query, position), scalar softmax.
    fn attend_portable(&self, s: &mut Work, scale: f32) {
        self.passes(
            s,
            |q, rows, seen, out| {
                for (o, k) in out.iter_mut().zip(rows.chunks_exact(q.len())).take(seen) {
                    *o = dot(q, k) * scale;
                }
            },
            crate::simd::softmax_scalar,
            |a, p, rows| {
                for (v, &p) in rows.chunks_exact(a.len()).zip(p) {
                    for (a, v) in a.iter_mut().zip(v) {
                        *a += p * v;
                    }
                }
            },
        )
    }

    /// AVX2: scores eight positions at a time with eight independent accumulators and one
    /// transposing reduction, a vector exp, and weighted sums of V rows held in registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `dim` is a multiple of 32 (`simd_fits`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn attend_avx2(&self, s: &mut Work, scale: f32) {
        self.passes(
            s,
            |q, rows, seen, out| {
                let dim = q.len();
                for k0 in (0..seen).step_by(8) {
                    // Rows k0..k0 + 8 exist (zero-padded to a multiple of eight) and the
                    // scores row has room for eight from k0 (its stride is a multiple of
                    // eight past the context).
                    let out = &mut out[k0..k0 + 8];
                    // SAFETY: the CPU has AVX2 and FMA (this function's contract).
                    unsafe {
                        simd::dot8(q, &rows[k0 * dim..(k0 + 8) * dim], scale, out.as_mut_ptr())
                    };
                }
            },
            crate::simd::softmax,
            // SAFETY: as above; `dim` is a multiple of 32.
            |a, p, rows| unsafe { simd::weighted_sum(a, p, rows) },
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// `out[k] = scale * (q . rows[k])` for the eight rows of `rows` (each `q.len()` long).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot8(q: &[f32], rows: &[f32], scale: f32, out: *mut f32) {
        let dim = q.len();
        debug_assert!(dim.is_multiple_of(8) && rows.len() == 8 * dim);
        let (q, r) = (q.as_ptr(), rows.as_ptr());
        let mut a = [_mm256_setzero_ps(); 8];
        for d in (0..dim).step_by(8) {
            let qv = _mm256_loadu_ps(q.add(d));
            for (k, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r.add(k * dim + d)), *a);
            }
        }
        // Lane k of the result is the sum of a[k]'s lanes.
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
        let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
        let s = _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale));
        _mm256_storeu_ps(out, s);
    }

    /// `acc += sum_j p[j] * rows[j]`, rows of `acc.len()` (a multiple of 32), the
    /// accumulator in registers 64 (then 32) elements at a time.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(acc: &mut [f32], p: &[f32], rows: &[f32]) {
        let dim = acc.len();
        let mut d = 0;
        while d + 64 <= dim {
            weighted_sum_n::<8>(acc, d, p, rows);
            d += 64;
        }
        if d < dim {
            weighted_sum_n::<4>(acc, d, p, rows);
        }
    }

    #[inline(always)]
    unsafe fn weighted_sum_n<const N: usize>(acc: &mut [f32], d: usize, p: &[f32], rows: &[f32]) {
        let dim = acc.len();
        let a_ptr = acc.as_mut_ptr().add(d);
        let mut a = [_mm256_setzero_ps(); N];
        for (i, a) in a.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(a_ptr.add(8 * i));
        }
        for (j, &w) in p.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            let r = rows.as_ptr().add(j * dim + d);
            for (i, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(8 * i)), *a);
            }
        }
        for (i, a) in a.iter().enumerate() {
            _mm256_storeu_ps(a_ptr.add(8 * i), *a);
        }
    }
}

impl PagedAttention<'_> {
    fn attend<E: KvElem>(&self, qkv: &[f32], cache: &[E]) -> Vec<f32> {
        self.attend_with(qkv, cache, simd_fits(self.heads.dim), self.batch.groups())
    }

    fn attend_with<E: KvElem>(
        &self,
        qkv: &[f32],
        cache: &[E],
        simd: bool,
        groups: &[TileGroup],
    ) -> Vec<f32> {
        let Heads { q: nh, kv, dim } = self.heads;
        let w = self.heads.qkv_width();
        let batch = self.batch;
        let n_tokens = batch.positions.len();
        let group = nh / kv;
        let slot_len = 2 * kv * dim;
        let scale = self.scale;
        let q_norm = self.norm.map(QkNorm::q);
        let mut out = vec![0f32; n_tokens * nh * dim];
        let out_ptr = out.as_mut_ptr() as usize;
        let max_ctx = batch.seq_slots.iter().map(|s| s.len()).max().unwrap_or(0);
        let most = groups
            .iter()
            .map(|g| g.tiles.iter().map(|(a, b)| b - a).sum::<usize>())
            .max()
            .unwrap_or(0)
            * group;
        // Work items are (group of tiles, KV head): every query head sharing that KV head,
        // for every token of the group's tiles, is scored against each cached K row while
        // it is loaded, and each V row is added into all of their outputs. Attention reads
        // the cache once per item instead of once per (token, query head), and once per
        // group for the prefix its tiles share; with long contexts those reads are its cost.
        candle_core::utils::barrier_pool().execute_chunked(groups.len() * kv, |items| {
            SCRATCH.with_borrow_mut(|scratch| {
                scratch.fit(most, max_ctx, dim);
                let Scratch {
                    queries,
                    visible,
                    work,
                } = scratch;
                let mut members = Vec::new();
                for item in items {
                    let (tg, g) = (&groups[item / kv], item % kv);
                    // Query i of a member is its token t0 + i / group, head
                    // g * group + i % group.
                    members.clear();
                    let mut n_q = 0;
                    for &(t0, t1) in &tg.tiles {
                        let start = n_q;
                        for t in t0..t1 {
                            let pos = batch.positions[t] as usize;
                            for h in g * group..(g + 1) * group {
                                let at = t * w + h * dim;
                                let q = &mut queries[n_q * dim..(n_q + 1) * dim];
                                self.rope.prepare(&qkv[at..at + dim], q_norm, pos, q);
                                visible[n_q] = pos + 1;
                                n_q += 1;
                            }
                        }
                        members.push(Member {
                            slots: batch.tile_slots((t0, t1)),
                            queries: start..n_q,
                        });
                    }
                    let it = Item {
                        cache,
                        members: &members,
                        shared: tg.shared,
                        slot_len,
                        k_off: g * dim,
                        v_off: kv * dim + g * dim,
                        dim,
                        visible: &visible[..n_q],
                        window: self.window.unwrap_or(usize::MAX),
                        queries: &queries[..n_q * dim],
                    };
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        // SAFETY: `simd_fits` checked the CPU's features and the head size.
                        unsafe { it.attend_avx2(work, scale) };
                    } else {
                        it.attend_portable(work, scale);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = simd;
                        it.attend_portable(work, scale);
                    }
                    for (m, &(t0, _)) in members.iter().zip(&tg.tiles) {
                        let accs =
                            work.acc[m.queries.start * dim..m.queries.end * dim].chunks_exact(dim);
                        for (i, a) in accs.enumerate() {
                            let (t, h) = (t0 + i / group, g * group + i % group);
                            // SAFETY: each (token, head) belongs to exactly one item, which
                            // owns its `dim` outputs.
                            let o = unsafe {
                                std::slice::from_raw_parts_mut(
                                    (out_ptr as *mut f32).add((t * nh + h) * dim),
                                    dim,
                                )
                            };
                            o.copy_from_slice(a);
                        }
                    }
                }
            })
        });
        out
    }
}

/// Whether the AVX2 kernel serves this head size on this CPU.
fn simd_fits(dim: usize) -> bool {
    dim.is_multiple_of(32) && crate::simd::has_avx2()
}

impl CustomOp2 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "forgeline-paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, "qkv")?;
        let Some((a, b)) = l2.contiguous_offsets() else {
            candle_core::bail!("kv cache must be contiguous")
        };
        let out = match s2 {
            CpuStorage::F32(v) => self.attend(qkv, &v[a..b]),
            CpuStorage::F16(v) => self.attend(qkv, &v[a..b]),
            _ => candle_core::bail!("kv cache must be f32 or f16"),
        };
        let (n_tokens, width) = (self.batch.positions.len(), self.heads.q * self.heads.dim);
        Ok((CpuStorage::F32(out), Shape::from((n_tokens, width))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::batch::tests::{layout_of, shared_batch};
    use crate::model::config::{Arch, ModelConfig};
    use rand::{Rng, SeedableRng};

    fn config(heads: Heads) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: heads.q * heads.dim,
            intermediate_size: 4 * heads.q * heads.dim,
            num_layers: 1,
            num_heads: heads.q,
            num_kv_heads: heads.kv,
            head_dim: heads.dim,
            vocab_size: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            context_length: 512,
            tie_word_embeddings: false,
            gemma: None,
        }
    }

    /// Three sequences in one batch: one decoding a token over 300 cached positions, one
    /// prefilling 7 tokens after 40 cached ones (tiles of 4 and 3, causal within the
    /// chunk), one prefilling 5 tokens from position 0. Slots are scattered.
    fn batch(rng: &mut impl Rng) -> BatchLayout {
        let mut free: Vec<u32> = (0..400).collect();
        let seqs = [(300usize, 1usize), (40, 7), (0, 5)]
            .into_iter()
            .map(|(cached, new)| {
                let slots = (0..cached + new)
                    .map(|_| free.swap_remove(rng.random_range(0..free.len())))
                    .collect();
                (slots, new)
            })
            .collect();
        layout_of(seqs)
    }

    fn check<E: KvElem>(from: fn(f32) -> E) {
        if !simd_fits(32) {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (q, kv, dim) in [(4, 2, 32), (9, 3, 64), (6, 2, 96), (8, 8, 128)] {
            let heads = Heads { q, kv, dim };
            let b = batch(&mut rng);
            let rope = RopeTable::new(&config(heads), 512);
            let n = b.positions.len();
            let qkv: Vec<f32> = (0..n * heads.qkv_width())
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let cache: Vec<E> = (0..400 * 2 * kv * dim)
                .map(|_| from(rng.random_range(-2.0f32..2.0)))
                .collect();
            // A sliding window (Gemma 3) on the wider heads: the first sequence's query sees
            // 17 of its 301 positions.
            let op = PagedAttention {
                heads,
                batch: &b,
                rope: &rope,
                norm: None,
                scale: 1.0 / (dim as f32).sqrt(),
                window: (dim >= 96).then_some(17),
            };
            let fast = op.attend_with(&qkv, &cache, true, b.groups());
            let slow = op.attend_with(&qkv, &cache, false, b.groups());
            let worst = fast
                .iter()
                .zip(&slow)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "dim {dim}: AVX2 differs from portable by {worst}"
            );
        }
    }

    #[test]
    fn grouped_attention_gives_the_bits_of_tile_by_tile() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let b = shared_batch(&mut rng);
        let groups = b.groups();
        assert!(groups.iter().any(|g| g.shared > 0));
        let singles: Vec<TileGroup> = groups
            .iter()
            .flat_map(|g| &g.tiles)
            .map(|&t| TileGroup {
                tiles: vec![t],
                shared: 0,
            })
            .collect();
        let heads = Heads {
            q: 9,
            kv: 3,
            dim: 64,
        };
        let rope = RopeTable::new(&config(heads), 512);
        let n = b.positions.len();
        let qkv: Vec<f32> = (0..n * heads.qkv_width())
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let cache: Vec<half::f16> = (0..1000 * 2 * heads.kv * heads.dim)
            .map(|_| half::f16::from_f32(rng.random_range(-2.0f32..2.0)))
            .collect();
        let op = PagedAttention {
            heads,
            batch: &b,
            rope: &rope,
            norm: None,
            scale: 1.0 / (heads.dim as f32).sqrt(),
            window: None,
        };
        for simd in [false, simd_fits(heads.dim)] {
            let grouped = op.attend_with(&qkv, &cache, simd, groups);
            let alone = op.attend_with(&qkv, &cache, simd, &singles);
            assert!(
                grouped
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "simd {simd}: grouped attention differs from tile-by-tile"
            );
        }
    }

    #[test]
    fn avx2_kernel_matches_portable_f32_cache() {
        check(|x| x);
    }

    #[test]
    fn avx2_kernel_matches_portable_f16_cache() {
        check(half::f16::from_f32);
    }
}
