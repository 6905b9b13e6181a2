//! Attention with candle tensor ops only (scatter into the cache, gather each sequence's slots,
//! matmul attention with a causal mask), for the same batches as the fused CPU kernels in
//! `attention`. Runs on every device; CUDA and Metal use it. Tests run it on CPU and compare
//! it with the fused kernels.

use candle_core::{DType, Tensor};

use super::attention::{Heads, QkNorm, RopeTable};
use super::batch::BatchLayout;

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

/// The generic path: K/V written with scatter_set, attention by matmul, per sequence. `norm`:
/// qwen3's and gemma3's RMS norms over each head of q and k, before the rotary embedding;
/// scores scaled by `scale`; `window`: positions each query sees, its own included (Gemma
/// 3's sliding layers), else all before it.
#[allow(clippy::too_many_arguments)]
pub fn generic_attention(
    heads: Heads,
    batch: &BatchLayout,
    gb: &GenericBatch,
    qkv: &Tensor,
    cache: &Tensor,
    norm: Option<&QkNorm>,
    scale: f32,
    window: Option<usize>,
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
    let (q, k) = match norm {
        Some(nm) => (
            candle_nn::ops::rms_norm(&q, &nm.q, nm.eps)?,
            candle_nn::ops::rms_norm(&k, &nm.k, nm.eps)?,
        ),
        None => (q, k),
    };
    let q = candle_nn::rotary_emb::rope_thd(&q, &gb.cos, &gb.sin)?.squeeze(0)?;
    let k = candle_nn::rotary_emb::rope_thd(&k, &gb.cos, &gb.sin)?.reshape((n, 1, kv, dim))?;
    let new_kv = Tensor::cat(&[&k, &v], 1)?.to_dtype(cache.dtype())?;
    cache.scatter_set(&gb.write_index, &new_kv, 0)?;

    let scale = scale as f64;
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
        let mut att = mask.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?;
        if let Some(w) = window {
            // Keys more than `w - 1` positions before the query's own.
            let far: Vec<u8> = range
                .clone()
                .flat_map(|t| {
                    let p = batch.positions[t] as usize;
                    (0..len).map(move |j| u8::from(j + w <= p))
                })
                .collect();
            let far = Tensor::from_vec(far, (range.len(), len), qkv.device())?
                .unsqueeze(0)?
                .broadcast_as(att.shape())?;
            att = far.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v_s)?; // [nh, n_s, dim]
        outs.push(o.transpose(0, 1)?.reshape((range.len(), nh * dim))?);
    }
    Tensor::cat(&outs, 0)
}
