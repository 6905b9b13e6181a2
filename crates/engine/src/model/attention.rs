//! Attention over the paged KV cache, for a batch that mixes sequences of different lengths.
//!
//! Two implementations of the same math:
//! - `cpu`: two fused kernels (write rotated K and V into their slots; attend each query to its
//!   own sequence's slots), parallel over (token, head) on candle's CPU thread pool. One op per
//!   step instead of a dozen small ones: on a small model, per-op overhead is most of the time.
//! - `generic`: candle tensor ops only (scatter into the cache, gather each sequence's slots,
//!   matmul attention with a causal mask). Runs on every device; CUDA and Metal use it. Tests
//!   run it on CPU and compare it with the fused kernels.

use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;

use crate::model::ModelConfig;

/// Per-token and per-sequence indices of one forward call.
pub struct BatchLayout {
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Cache slot each token's K and V are written to.
    pub write_slots: Vec<u32>,
    /// Index of each token's sequence.
    pub token_seq: Vec<u32>,
    /// For each sequence, the slots of positions 0..=its last position in this batch.
    pub seq_slots: Vec<Vec<u32>>,
    /// For each sequence, the range of its tokens in the batch.
    pub seq_tokens: Vec<std::ops::Range<usize>>,
}

/// cos/sin of the rotary embedding per position: [positions, head_dim / 2].
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    pub fn new(cfg: &ModelConfig, positions: usize) -> Self {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
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
                self.rope.rotate(k, pos as usize, &mut rotated);
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

/// Tokens of one sequence whose queries share one pass over its cache.
const QUERY_TILE: usize = 4;

/// Attention of every query of `qkv` [T, qkv_width] over its own sequence's cached positions
/// up to its own; returns [T, q_heads * head_dim].
pub struct PagedAttention<'a> {
    pub heads: Heads,
    pub batch: &'a BatchLayout,
    pub rope: &'a RopeTable,
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

impl PagedAttention<'_> {
    fn attend<E: KvElem>(&self, qkv: &[f32], cache: &[E]) -> Vec<f32> {
        let Heads { q: nh, kv, dim } = self.heads;
        let w = self.heads.qkv_width();
        let batch = self.batch;
        let n_tokens = batch.positions.len();
        let group = nh / kv;
        let slot_len = 2 * kv * dim;
        let scale = 1.0 / (dim as f32).sqrt();
        let mut out = vec![0f32; n_tokens * nh * dim];
        let out_ptr = out.as_mut_ptr() as usize;
        let max_ctx = batch.seq_slots.iter().map(|s| s.len()).max().unwrap_or(0);
        // Work items are (tile of up to QUERY_TILE consecutive tokens of one sequence, KV
        // head): every query head sharing that KV head, for every token of the tile, is
        // scored against each cached K row while it is loaded, and each V row is added into
        // all of their outputs. Attention reads the cache once per item instead of once per
        // (token, query head), and with long contexts those reads are its cost.
        let mut tiles = Vec::new();
        for r in &batch.seq_tokens {
            let mut t = r.start;
            while t < r.end {
                tiles.push((t, (t + QUERY_TILE).min(r.end)));
                t += QUERY_TILE;
            }
        }
        let most = QUERY_TILE * group;
        candle_core::utils::barrier_pool().execute_chunked(tiles.len() * kv, |items| {
            let mut scores = vec![0f32; most * max_ctx];
            let mut qr = vec![0f32; most * dim];
            let mut acc = vec![0f32; most * dim];
            let mut row = vec![0f32; dim];
            for item in items {
                let ((t0, t1), g) = (tiles[item / kv], item % kv);
                // Query i is token t0 + i / group, head g * group + i % group; positions rise
                // with the token, so the queries that see cache position j are a suffix,
                // from `first(j)`.
                let n_q = (t1 - t0) * group;
                let pos = &batch.positions[t0..t1];
                let first = |j: usize| pos.partition_point(|&p| (p as usize) < j) * group;
                let slots =
                    &batch.seq_slots[batch.token_seq[t0] as usize][..=pos[pos.len() - 1] as usize];
                for (i, q) in qr.chunks_exact_mut(dim).take(n_q).enumerate() {
                    let (t, h) = (t0 + i / group, g * group + i % group);
                    let at = t * w + h * dim;
                    self.rope
                        .rotate(&qkv[at..at + dim], pos[i / group] as usize, q);
                }
                let mut from = 0;
                for (j, &slot) in slots.iter().enumerate() {
                    if from < n_q && j > pos[from / group] as usize {
                        from = first(j);
                    }
                    let base = slot as usize * slot_len + g * dim;
                    E::load(&cache[base..base + dim], &mut row);
                    for (i, q) in qr.chunks_exact(dim).enumerate().take(n_q).skip(from) {
                        scores[i * max_ctx + j] = dot(q, &row) * scale;
                    }
                }
                for (i, a) in acc.chunks_exact_mut(dim).take(n_q).enumerate() {
                    let row = &mut scores[i * max_ctx..i * max_ctx + pos[i / group] as usize + 1];
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|s| *s *= inv);
                    a.fill(0.0);
                }
                let mut from = 0;
                for (j, &slot) in slots.iter().enumerate() {
                    if from < n_q && j > pos[from / group] as usize {
                        from = first(j);
                    }
                    let base = slot as usize * slot_len + kv * dim + g * dim;
                    E::load(&cache[base..base + dim], &mut row);
                    for (i, a) in acc.chunks_exact_mut(dim).enumerate().take(n_q).skip(from) {
                        let p = scores[i * max_ctx + j];
                        for (a, v) in a.iter_mut().zip(&row) {
                            *a += p * v;
                        }
                    }
                }
                for (i, a) in acc.chunks_exact(dim).take(n_q).enumerate() {
                    let (t, h) = (t0 + i / group, g * group + i % group);
                    // SAFETY: each (token, head) belongs to exactly one item, which owns its
                    // `dim` outputs.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_ptr as *mut f32).add((t * nh + h) * dim),
                            dim,
                        )
                    };
                    o.copy_from_slice(a);
                }
            }
        });
        out
    }
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

/// Tensors the generic path builds once per forward call and reuses in every layer.
pub struct GenericBatch {
    cos: Tensor,
    sin: Tensor,
    /// [T, 2, kv_heads, head_dim] copies of each token's write slot, for scatter_set.
    write_index: Tensor,
    seq_slots: Vec<Tensor>,
    masks: Vec<Tensor>,
}

impl GenericBatch {
    pub fn new(
        heads: Heads,
        batch: &BatchLayout,
        rope: &RopeTable,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let half = rope.half;
        let pick = |table: &[f32]| -> Vec<f32> {
            batch
                .positions
                .iter()
                .flat_map(|&p| {
                    table[p as usize * half..(p as usize + 1) * half]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let n = batch.positions.len();
        let cos = Tensor::from_vec(pick(&rope.cos), (n, half), device)?;
        let sin = Tensor::from_vec(pick(&rope.sin), (n, half), device)?;
        let write_index = Tensor::new(batch.write_slots.as_slice(), device)?
            .reshape((n, 1, 1, 1))?
            .broadcast_as((n, 2, heads.kv, heads.dim))?
            .contiguous()?;
        let mut seq_slots = Vec::new();
        let mut masks = Vec::new();
        for (s, range) in batch.seq_tokens.iter().enumerate() {
            let slots = &batch.seq_slots[s];
            seq_slots.push(Tensor::new(slots.as_slice(), device)?);
            // 1 where a query may not look: keys after its own position.
            let mask: Vec<u8> = range
                .clone()
                .flat_map(|t| {
                    let p = batch.positions[t] as usize;
                    (0..slots.len()).map(move |j| u8::from(j > p))
                })
                .collect();
            masks.push(Tensor::from_vec(mask, (range.len(), slots.len()), device)?);
        }
        Ok(Self {
            cos,
            sin,
            write_index,
            seq_slots,
            masks,
        })
    }
}

/// The generic path: K/V written with scatter_set, attention by matmul, per sequence.
pub fn generic_attention(
    heads: Heads,
    batch: &BatchLayout,
    gb: &GenericBatch,
    qkv: &Tensor,
    cache: &Tensor,
) -> candle_core::Result<Tensor> {
    let Heads { q: nh, kv, dim } = heads;
    let n = qkv.dim(0)?;
    let q = qkv
        .narrow(1, 0, nh * dim)?
        .contiguous()?
        .reshape((1, n, nh, dim))?;
    let k = qkv
        .narrow(1, nh * dim, kv * dim)?
        .contiguous()?
        .reshape((1, n, kv, dim))?;
    let v = qkv
        .narrow(1, (nh + kv) * dim, kv * dim)?
        .reshape((n, 1, kv, dim))?;
    let q = candle_nn::rotary_emb::rope_thd(&q, &gb.cos, &gb.sin)?.squeeze(0)?;
    let k = candle_nn::rotary_emb::rope_thd(&k, &gb.cos, &gb.sin)?.reshape((n, 1, kv, dim))?;
    let new_kv = Tensor::cat(&[&k, &v], 1)?.to_dtype(cache.dtype())?;
    cache.scatter_set(&gb.write_index, &new_kv, 0)?;

    let scale = 1.0 / (dim as f64).sqrt();
    let neg_inf = Tensor::new(f32::NEG_INFINITY, qkv.device())?;
    let mut outs = Vec::with_capacity(batch.seq_tokens.len());
    for (s, range) in batch.seq_tokens.iter().enumerate() {
        let kv_s = cache
            .index_select(&gb.seq_slots[s], 0)? // [L, 2, kv, dim]
            .to_dtype(DType::F32)?;
        let len = kv_s.dim(0)?;
        let expand = |t: Tensor| -> candle_core::Result<Tensor> {
            // [L, kv, dim] -> [nh, L, dim], each kv head repeated for its query heads.
            t.transpose(0, 1)?
                .unsqueeze(1)?
                .broadcast_as((kv, nh / kv, len, dim))?
                .reshape((nh, len, dim))
        };
        let k_s = expand(kv_s.narrow(1, 0, 1)?.squeeze(1)?)?;
        let v_s = expand(kv_s.narrow(1, 1, 1)?.squeeze(1)?)?;
        let q_s = q
            .narrow(0, range.start, range.len())?
            .transpose(0, 1)?
            .contiguous()?;
        let att = (q_s.matmul(&k_s.t()?)? * scale)?;
        let mask = gb.masks[s].unsqueeze(0)?.broadcast_as(att.shape())?;
        let att = mask.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v_s)?; // [nh, n_s, dim]
        outs.push(o.transpose(0, 1)?.reshape((range.len(), nh * dim))?);
    }
    Tensor::cat(&outs, 0)
}
