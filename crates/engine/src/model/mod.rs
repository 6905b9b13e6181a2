//! forgeline's own model code for the llama, qwen2, qwen3 and gemma3 architectures.
//!
//! Weights are immutable and shared (`Model` is `Send + Sync` and takes `&self`); the KV cache
//! is owned by the caller; every token carries its own position, so one `forward` runs many
//! sequences of different lengths at once, prompt chunks and single-token decode steps mixed.
//!
//! Rotary embeddings use the non-interleaved ("neox") convention throughout. GGUF llama files
//! store q/k rows for the interleaved convention; their rows are permuted once at load time,
//! which leaves every attention score unchanged (q and k get the same permutation).

pub mod attention;
pub mod batch;
pub mod config;
pub(crate) mod files;
pub mod generic_attention;
pub mod gguf;
mod qblocks;
pub mod qmatmul;
mod swiglu;
pub mod weights;

use std::path::Path;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{BatchError, ConfigError};
use crate::kv_cache::{BlockTable, KvCache};
use crate::memory::ForkExcluded;
use crate::{Error, Result};
use attention::{Heads, PagedAttention, QkNorm, RopeTable, WriteKv};
use batch::BatchLayout;
pub use config::{Arch, ModelConfig};
use generic_attention::GenericBatch;
use weights::{RawLinear, Weight, WeightSource};

/// The weight of a linear layer, and which kernel multiplies by it.
enum LinearWeight {
    /// candle's quantized or dense matmul, on any device.
    Candle(QMatMul),
    /// forgeline's own kernel for GGUF's common types (CPU only; candle lacks SIMD dot products
    /// for several of them, and its matmul decodes each weight row again for every input row).
    Quant(qmatmul::QuantWeights),
}

/// A linear layer: quantized or dense weight, optional bias.
struct Linear {
    w: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    /// `path` names the weights file, for a weight whose size does not match its shape.
    fn new(w: RawLinear, bias: Option<Tensor>, path: &Path, device: &Device) -> Result<Self> {
        let w = match w {
            RawLinear::Quantized {
                dtype,
                data,
                rows,
                cols,
            } if device.is_cpu() && qmatmul::supports(dtype) => {
                match qmatmul::QuantWeights::new(dtype, &data, rows, cols) {
                    Ok(w) => LinearWeight::Quant(w),
                    Err(qmatmul::RepackError::Malformed(msg)) => {
                        return Err(Error::bad_model(path, msg))
                    }
                    Err(qmatmul::RepackError::Unrepresentable) => LinearWeight::Candle(
                        RawLinear::Quantized {
                            dtype,
                            data,
                            rows,
                            cols,
                        }
                        .into_qmatmul(device)?,
                    ),
                }
            }
            w => LinearWeight::Candle(w.into_qmatmul(device)?),
        };
        Ok(Self { w, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            LinearWeight::Candle(w) => w.forward(x)?,
            LinearWeight::Quant(w) => x.apply_op1_no_bwd(&qmatmul::QuantMatMul(w))?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Several linears over the same input, stacked into one matmul when their storage allows.
enum Stacked {
    Fused(Linear),
    Split(Vec<Linear>),
}

impl Stacked {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Stacked::Fused(l) => l.forward(x),
            Stacked::Split(ls) => {
                let ys = ls
                    .iter()
                    .map(|l| l.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ys, 1)?)
            }
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    qkv: Stacked,
    /// qwen3's per-head norms of q and k.
    qk_norm: Option<QkNorm>,
    o: Linear,
    ffn_norm: Tensor,
    gate_up: Stacked,
    down: Linear,
    /// Gemma 3's norms of the attention and feed-forward outputs, before each residual add.
    post_norms: Option<(Tensor, Tensor)>,
    /// Gemma 3's sliding layers: positions each query sees, its own included.
    window: Option<usize>,
}

/// How attention (and the feed-forward activation) run: forgeline's fused CPU kernels, or
/// candle tensor ops on any device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    FusedCpu,
    Generic,
}

pub struct Model {
    cfg: ModelConfig,
    device: Device,
    /// Declared before `embed`, so that it drops first.
    _fork: ForkExcluded,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTable,
    /// Gemma 3's sliding layers' rotary table (a base of their own).
    rope_local: Option<RopeTable>,
    attention: AttentionImpl,
}

/// One sequence's part of a forward call: `tokens` at positions `start_pos..`, whose KV goes
/// into `table` (which must already cover them). `logits`: whether to return the logits of
/// its last token.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub table: &'a BlockTable,
    pub logits: bool,
}

impl Model {
    pub fn load(
        cfg: ModelConfig,
        src: &mut dyn WeightSource,
        permute_qk: bool,
        device: &Device,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        // interleaved pair (2j, 2j+1) -> non-interleaved pair (j, j + d/2), within each head.
        let perm = |heads: usize| -> Vec<usize> {
            (0..heads)
                .flat_map(|hd| {
                    let base = hd * d;
                    (0..d / 2)
                        .map(move |j| base + 2 * j)
                        .chain((0..d / 2).map(move |j| base + 2 * j + 1))
                })
                .collect()
        };
        // Every shape first: a wrong one is named before gigabytes of weights are read.
        check_shapes(&cfg, src)?;
        let path = src.path().to_path_buf();
        let path = path.as_path();
        let linear = |src: &mut dyn WeightSource, w: Weight, rows, cols| src.linear(w, rows, cols);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut q = linear(src, Weight::Q(l), nh * d, h)?;
            let mut k = linear(src, Weight::K(l), nkv * d, h)?;
            let v = linear(src, Weight::V(l), nkv * d, h)?;
            let mut biases = None;
            if src.has(Weight::QBias(l)) {
                let qb = src.dense(Weight::QBias(l), &[nh * d], device)?;
                let kb = src.dense(Weight::KBias(l), &[nkv * d], device)?;
                let vb = src.dense(Weight::VBias(l), &[nkv * d], device)?;
                biases = Some((qb, kb, vb));
            }
            let mut qk_norm = None;
            // Gemma's norm weights as Hugging Face stores them lack the 1 its norm adds.
            let offset = cfg.gemma.as_ref().map_or(0.0, |g| g.norm_offset as f64);
            let norm = |src: &mut dyn WeightSource, w: Weight, n: usize| -> Result<Tensor> {
                let t = src.dense(w, &[n], device)?;
                Ok(if offset != 0.0 { (t + offset)? } else { t })
            };
            if cfg.arch.qk_norm() {
                let qn = norm(src, Weight::QNorm(l), d)?;
                let kn = norm(src, Weight::KNorm(l), d)?;
                qk_norm = Some((qn, kn));
            }
            if permute_qk {
                q = q.permute_rows(&perm(nh))?;
                k = k.permute_rows(&perm(nkv))?;
                if let Some((qn, kn)) = qk_norm.take() {
                    // Within a head, the norm weights follow the rows they scale.
                    let idx: Vec<u32> = perm(1).into_iter().map(|x| x as u32).collect();
                    let idx = Tensor::new(idx.as_slice(), device)?;
                    qk_norm = Some((qn.index_select(&idx, 0)?, kn.index_select(&idx, 0)?));
                }
                if let Some((qb, kb, vb)) = biases.take() {
                    let p = |t: Tensor, heads| -> Result<Tensor> {
                        let idx: Vec<u32> = perm(heads).into_iter().map(|x| x as u32).collect();
                        Ok(t.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?)
                    };
                    biases = Some((p(qb, nh)?, p(kb, nkv)?, vb));
                }
            }
            let qkv = stack(
                vec![q, k, v],
                biases.map(|(a, b, c)| vec![a, b, c]),
                path,
                device,
            )?;
            let gate = linear(src, Weight::Gate(l), i, h)?;
            let up = linear(src, Weight::Up(l), i, h)?;
            let eps = cfg.rms_norm_eps as f32;
            let gemma = cfg.gemma.is_some();
            let post_norms = if gemma {
                Some((
                    norm(src, Weight::PostAttnNorm(l), h)?,
                    norm(src, Weight::PostFfnNorm(l), h)?,
                ))
            } else {
                None
            };
            let ffn_norm = if gemma {
                Weight::PreFfnNorm(l)
            } else {
                Weight::FfnNorm(l)
            };
            layers.push(Layer {
                attn_norm: norm(src, Weight::AttnNorm(l), h)?,
                qkv,
                qk_norm: qk_norm.map(|(q, k)| QkNorm::new(q, k, eps)).transpose()?,
                o: plain(linear(src, Weight::O(l), h, nh * d)?, path, device)?,
                ffn_norm: norm(src, ffn_norm, h)?,
                gate_up: stack(vec![gate, up], None, path, device)?,
                down: plain(linear(src, Weight::Down(l), h, i)?, path, device)?,
                post_norms,
                window: cfg.window(l),
            });
        }
        let embed = src.dense(Weight::Embed, &[cfg.vocab_size, h], device)?;
        let lm_head = plain(
            linear(src, Weight::LmHead, cfg.vocab_size, h)?,
            path,
            device,
        )?;
        let mut norm = src.dense(Weight::Norm, &[h], device)?;
        if let Some(g) = cfg.gemma.as_ref().filter(|g| g.norm_offset != 0.0) {
            norm = (norm + g.norm_offset as f64)?;
        }
        let attention = if device.is_cpu() {
            AttentionImpl::FusedCpu
        } else {
            AttentionImpl::Generic
        };
        Ok(Self {
            rope: RopeTable::new(&cfg, cfg.context_length),
            rope_local: cfg
                .rope_inv_freq_local()
                .map(|inv| RopeTable::from_inv_freq(&inv, cfg.context_length)),
            cfg,
            device: device.clone(),
            _fork: ForkExcluded::tensor(&embed),
            embed,
            layers,
            norm,
            lm_head,
            attention,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Chooses the attention implementation (tests compare them; CPU defaults to fused).
    pub fn set_attention(&mut self, a: AttentionImpl) -> Result<()> {
        if a == AttentionImpl::FusedCpu && !self.device.is_cpu() {
            return Err(ConfigError::FusedAttentionNeedsCpu.into());
        }
        self.attention = a;
        Ok(())
    }

    /// What attention scores are scaled by: 1/sqrt(head size), or Gemma 3's own.
    fn attn_scale(&self) -> f32 {
        match &self.cfg.gemma {
            Some(g) => g.attn_scale,
            None => 1.0 / (self.cfg.head_dim as f32).sqrt(),
        }
    }

    fn heads(&self) -> Heads {
        Heads {
            q: self.cfg.num_heads,
            kv: self.cfg.num_kv_heads,
            dim: self.cfg.head_dim,
        }
    }

    fn layout(&self, seqs: &[SeqInput], block_size: usize) -> Result<BatchLayout> {
        let mut b = BatchLayout {
            positions: Vec::new(),
            write_slots: Vec::new(),
            token_seq: Vec::new(),
            seq_slots: Vec::with_capacity(seqs.len()),
            seq_tokens: Vec::with_capacity(seqs.len()),
            tile_groups: Default::default(),
        };
        for (s, seq) in seqs.iter().enumerate() {
            let end = seq.start_pos + seq.tokens.len();
            if seq.tokens.is_empty() {
                return Err(BatchError::EmptySequence { seq: s }.into());
            }
            if end > self.cfg.context_length {
                return Err(BatchError::BeyondContext {
                    seq: s,
                    end,
                    context: self.cfg.context_length,
                }
                .into());
            }
            if seq.table.blocks().len() * block_size < end {
                return Err(BatchError::BlockTable {
                    seq: s,
                    covered: seq.table.blocks().len() * block_size,
                    needed: end,
                }
                .into());
            }
            if let Some(&bad) = seq
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(BatchError::Token {
                    token: bad,
                    vocab: self.cfg.vocab_size,
                }
                .into());
            }
            let first = b.positions.len();
            b.positions.extend(seq.start_pos as u32..end as u32);
            b.write_slots
                .extend(seq.table.slots(block_size, seq.start_pos..end));
            b.token_seq
                .extend(std::iter::repeat_n(s as u32, seq.tokens.len()));
            b.seq_slots.push(seq.table.slots(block_size, 0..end));
            b.seq_tokens.push(first..b.positions.len());
        }
        Ok(b)
    }

    /// Runs one forward pass over all `seqs`, writing their KV into `kv`. Returns the logits
    /// [n, vocab] of the last token of each sequence whose `logits` flag is set, in order.
    pub fn forward(&self, seqs: &[SeqInput], kv: &KvCache) -> Result<Tensor> {
        let _span = tracing::trace_span!("forward", seqs = seqs.len()).entered();
        let batch = self.layout(seqs, kv.block_size())?;
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let heads = self.heads();
        let scale = self.attn_scale();
        // The generic path's rotary tensors, per rotary table (Gemma 3's sliding layers
        // have one of their own).
        let generic = match self.attention {
            AttentionImpl::Generic => Some((
                GenericBatch::new(heads, &batch, &self.rope, &self.device)?,
                self.rope_local
                    .as_ref()
                    .map(|r| GenericBatch::new(heads, &batch, r, &self.device))
                    .transpose()?,
            )),
            AttentionImpl::FusedCpu => None,
        };
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = self.embed.index_select(&ids, 0)?;
        if self.cfg.gemma.is_some() {
            x = (x * (self.cfg.hidden_size as f64).sqrt())?;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = layer.qkv.forward(&h)?;
            let cache = kv.layer(l);
            let local = layer.window.is_some();
            let rope = match (&self.rope_local, local) {
                (Some(r), true) => r,
                _ => &self.rope,
            };
            let attn = match &generic {
                None => {
                    let norm = layer.qk_norm.as_ref();
                    cache.inplace_op2(
                        &qkv,
                        &WriteKv {
                            heads,
                            batch: &batch,
                            rope,
                            norm,
                        },
                    )?;
                    qkv.apply_op2_no_bwd(
                        cache,
                        &PagedAttention {
                            heads,
                            batch: &batch,
                            rope,
                            norm,
                            scale,
                            window: layer.window,
                        },
                    )?
                }
                Some((gb, gb_local)) => generic_attention::generic_attention(
                    heads,
                    &batch,
                    match (gb_local, local) {
                        (Some(g), true) => g,
                        _ => gb,
                    },
                    &qkv,
                    cache,
                    layer.qk_norm.as_ref(),
                    scale,
                    layer.window,
                )?,
            };
            let mut attn = layer.o.forward(&attn)?;
            if let Some((post_attn, _)) = &layer.post_norms {
                attn = candle_nn::ops::rms_norm(&attn, post_attn, eps)?;
            }
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gu = layer.gate_up.forward(&h)?;
            let i = self.cfg.intermediate_size;
            // Gemma: GELU (tanh approximation, gelu_pytorch_tanh) of the gate; else SiLU.
            let gelu = layer.post_norms.is_some();
            let act = match self.attention {
                AttentionImpl::FusedCpu => gu.apply_op1_no_bwd(&swiglu::SwiGlu {
                    width: i,
                    act: if gelu {
                        swiglu::Activation::GeluTanh
                    } else {
                        swiglu::Activation::Silu
                    },
                })?,
                AttentionImpl::Generic => {
                    let gate = gu.narrow(1, 0, i)?;
                    let gate = if gelu {
                        gate.gelu()?
                    } else {
                        candle_nn::ops::silu(&gate)?
                    };
                    (gate * gu.narrow(1, i, i)?)?
                }
            };
            let mut ffn = layer.down.forward(&act)?;
            if let Some((_, post_ffn)) = &layer.post_norms {
                ffn = candle_nn::ops::rms_norm(&ffn, post_ffn, eps)?;
            }
            x = (x + ffn)?;
        }
        let rows: Vec<u32> = seqs
            .iter()
            .zip(&batch.seq_tokens)
            .filter(|(s, _)| s.logits)
            .map(|(_, r)| (r.end - 1) as u32)
            .collect();
        if rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let x = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward(&x)
    }
}

/// Checks that every tensor `Model::load` reads is present with the shape `cfg` implies.
fn check_shapes(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<()> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    for l in 0..cfg.num_layers {
        let mut want = vec![
            (Weight::AttnNorm(l), vec![h]),
            (Weight::Q(l), vec![q, h]),
            (Weight::K(l), vec![kv, h]),
            (Weight::V(l), vec![kv, h]),
            (Weight::O(l), vec![h, q]),
            (Weight::Gate(l), vec![i, h]),
            (Weight::Up(l), vec![i, h]),
            (Weight::Down(l), vec![h, i]),
        ];
        if src.has(Weight::QBias(l)) {
            want.push((Weight::QBias(l), vec![q]));
            want.push((Weight::KBias(l), vec![kv]));
            want.push((Weight::VBias(l), vec![kv]));
        }
        if cfg.arch.qk_norm() {
            want.push((Weight::QNorm(l), vec![cfg.head_dim]));
            want.push((Weight::KNorm(l), vec![cfg.head_dim]));
        }
        if cfg.gemma.is_some() {
            want.push((Weight::PreFfnNorm(l), vec![h]));
            want.push((Weight::PostAttnNorm(l), vec![h]));
            want.push((Weight::PostFfnNorm(l), vec![h]));
        } else {
            want.push((Weight::FfnNorm(l), vec![h]));
        }
        for (w, shape) in want {
            src.check_shape(w, &shape)?;
        }
    }
    src.check_shape(Weight::Embed, &[v, h])?;
    src.check_shape(Weight::LmHead, &[v, h])?;
    src.check_shape(Weight::Norm, &[h])
}

fn plain(w: RawLinear, path: &Path, device: &Device) -> Result<Linear> {
    Linear::new(w, None, path, device)
}

fn stack(
    parts: Vec<RawLinear>,
    biases: Option<Vec<Tensor>>,
    path: &Path,
    device: &Device,
) -> Result<Stacked> {
    Ok(match RawLinear::concat_rows(parts)? {
        Ok(w) => Stacked::Fused(Linear::new(
            w,
            biases.map(|b| Tensor::cat(&b, 0)).transpose()?,
            path,
            device,
        )?),
        Err(parts) => {
            let mut biases = biases.map(|b| b.into_iter());
            Stacked::Split(
                parts
                    .into_iter()
                    .map(|p| Linear::new(p, biases.as_mut().and_then(|b| b.next()), path, device))
                    .collect::<Result<_>>()?,
            )
        }
    })
}
