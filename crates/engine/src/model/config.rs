//! The hyper-parameters forgeline's model code needs, read from GGUF metadata or config.json.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen3 and Qwen3-Coder's dense models: qwen2 without the q/k/v biases, with an RMS norm
    /// over each head of q and of k before the rotary embedding (`q_norm`, `k_norm`) and a
    /// head size of its own (`head_dim`, GGUF `attention.key_length`), often not
    /// hidden / heads.
    Qwen3,
    /// Gemma 3's text models: qwen3's per-head q/k norms, plus embeddings scaled by
    /// sqrt(hidden), a norm after attention and after the feed-forward block (before each
    /// residual add), GELU (tanh) instead of SiLU in the gated feed-forward, and layers that
    /// attend to a sliding window (with a rotary base of their own) between layers that
    /// attend to everything (see `GemmaConfig`).
    Gemma3,
}

/// Every architecture, with its GGUF name (`general.architecture`) and the Hugging Face
/// class names (`architectures` in config.json) read as it.
const ARCHS: [(Arch, &str, &[&str]); 4] = [
    (
        Arch::Llama,
        "llama",
        &["LlamaForCausalLM", "MistralForCausalLM"],
    ),
    (Arch::Qwen2, "qwen2", &["Qwen2ForCausalLM"]),
    (Arch::Qwen3, "qwen3", &["Qwen3ForCausalLM"]),
    (
        Arch::Gemma3,
        "gemma3",
        &["Gemma3ForCausalLM", "gemma3_text"],
    ),
];

impl Arch {
    pub fn parse(name: &str) -> Option<Self> {
        ARCHS
            .iter()
            .find(|(_, gguf, hf)| *gguf == name || hf.contains(&name))
            .map(|(a, _, _)| *a)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Whether each head of q and k goes through an RMS norm of its own before the rotary
    /// embedding.
    pub fn qk_norm(&self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// The GGUF names forgeline reads, for errors: "llama, qwen2, qwen3".
    pub fn supported_gguf() -> String {
        ARCHS.map(|(_, g, _)| g).join(", ")
    }

    /// The Hugging Face class names forgeline reads, for errors.
    pub fn supported_hf() -> String {
        ARCHS
            .iter()
            .flat_map(|(_, _, hf)| hf.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// What Gemma 3 adds to the shared architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaConfig {
    /// Positions a sliding layer's query sees, its own included.
    pub sliding_window: usize,
    /// Per layer: whether it attends to the sliding window (else to everything).
    pub sliding: Vec<bool>,
    /// Rotary base of the sliding layers (the others use `rope_theta`).
    pub local_rope_theta: f32,
    /// Linear rotary scaling of the global layers (positions divided by it); 1: none.
    pub rope_linear_factor: f32,
    /// Attention scores are scaled by this (query_pre_attn_scalar^-1/2).
    pub attn_scale: f32,
    /// Added to every RMS norm weight at load: Hugging Face stores Gemma's norms as w with
    /// x * (1 + w) meant; GGUF files have the 1 added already.
    pub norm_offset: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    /// Gemma 3's parts; None for the other architectures.
    pub gemma: Option<GemmaConfig>,
}

/// Upper bounds of the hyper-parameters (several times the largest released models').
const MAX_HIDDEN: usize = 1 << 17;
const MAX_INTERMEDIATE: usize = 1 << 20;
const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
const MAX_HEAD_DIM: usize = 1 << 12;
const MAX_VOCAB: usize = 1 << 23;
const MAX_CONTEXT: usize = 1 << 21;

impl ModelConfig {
    /// Checks the relations the forward pass relies on, and that every size is positive and
    /// within a bound no real model reaches (the rotary table alone is context x head_dim
    /// floats, allocated at load); `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::bad_model(path, msg));
        for (what, v, max) in [
            ("hidden size", self.hidden_size, MAX_HIDDEN),
            (
                "intermediate size",
                self.intermediate_size,
                MAX_INTERMEDIATE,
            ),
            ("layer count", self.num_layers, MAX_LAYERS),
            ("attention head count", self.num_heads, MAX_HEADS),
            ("kv head count", self.num_kv_heads, MAX_HEADS),
            ("head dimension", self.head_dim, MAX_HEAD_DIM),
            ("vocabulary size", self.vocab_size, MAX_VOCAB),
            ("context length", self.context_length, MAX_CONTEXT),
        ] {
            if v == 0 || v > max {
                return bad(format!("{what} is {v}, expected 1 to {max}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} kv heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} is odd", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "RMS norm epsilon {} is not a finite non-negative number",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope theta {} is not a finite positive number",
                self.rope_theta
            ));
        }
        if let Some(g) = &self.gemma {
            if g.sliding.len() != self.num_layers {
                return bad(format!(
                    "{} layer attention kinds for {} layers",
                    g.sliding.len(),
                    self.num_layers
                ));
            }
            if g.sliding_window == 0 || g.sliding_window > MAX_CONTEXT {
                return bad(format!(
                    "sliding window is {}, expected 1 to {MAX_CONTEXT}",
                    g.sliding_window
                ));
            }
            for (what, v) in [
                ("local rope theta", g.local_rope_theta),
                ("rope scaling factor", g.rope_linear_factor),
                ("attention scale", g.attn_scale),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return bad(format!("{what} {v} is not a finite positive number"));
                }
            }
        }
        Ok(())
    }

    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let arch_name = md_string(ct, "general.architecture", path)?;
        let arch = Arch::parse(&arch_name).ok_or_else(|| {
            Error::bad_model(
                path,
                format!(
                    "unsupported architecture `{arch_name}` (supported: {})",
                    Arch::supported_gguf()
                ),
            )
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| md_u32(ct, &key(k), path).map(|v| v as usize);
        // An optional key: absent is None, present but unreadable is an error.
        let opt = |k: &str| -> Result<Option<usize>> {
            if ct.metadata.contains_key(&key(k)) {
                u(k).map(Some)
            } else {
                Ok(None)
            }
        };
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads = u("attention.head_count_kv").unwrap_or(num_heads);
        // As llama.cpp: the head size is `attention.key_length` where the file has it (qwen3's
        // is often not hidden / heads), else hidden / heads.
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => hidden_size.checked_div(num_heads).unwrap_or(0),
        };
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(Error::bad_model(
                    path,
                    format!(
                        "value head size {v} differs from key head size {head_dim}: not supported"
                    ),
                ));
            }
        }
        let rope_dim = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(Error::bad_model(
                path,
                format!("partial rotary embeddings (rope dim {rope_dim} of head dim {head_dim}) are not supported"),
            ));
        }
        let vocab_size = if ct.metadata.contains_key(&key("vocab_size")) {
            u("vocab_size")?
        } else if let Some(v) = ct.metadata.get("tokenizer.ggml.tokens") {
            v.to_vec()
                .map_err(|_| wrong_type(path, "tokenizer.ggml.tokens", v, "an array"))?
                .len()
        } else {
            // GGUF lists dims outermost first: the embedding is [vocab, hidden].
            let dims = tensor_dims(ct, "token_embd.weight", path)?;
            match dims[..] {
                [vocab, _] => vocab,
                _ => {
                    return Err(Error::bad_model(
                        path,
                        format!("tensor `token_embd.weight` has shape {dims:?}, expected [vocab, {hidden_size}]"),
                    ))
                }
            }
        };
        let num_layers = u("block_count")?;
        let gemma = match arch {
            Arch::Gemma3 => Some(gemma_from_gguf(
                ct,
                &arch_name,
                num_layers,
                hidden_size,
                num_heads,
                head_dim,
                path,
            )?),
            _ => None,
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: md_f32(ct, &key("attention.layer_norm_rms_epsilon"), path)? as f64,
            rope_theta: md_f32(ct, &key("rope.freq_base"), path).unwrap_or(10_000.0),
            rope_scaling: None,
            context_length: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            gemma,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses a Hugging Face config.json.
    pub fn from_hf_config(json: &str, path: &Path) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(json)
            .map_err(|e| Error::bad_model(path, format!("invalid config.json: {e}")))?;
        let arch_name = c
            .architectures
            .first()
            .cloned()
            .or(c.model_type.clone())
            .unwrap_or_default();
        let arch = Arch::parse(&arch_name)
            .or_else(|| c.model_type.as_deref().and_then(Arch::parse))
            .ok_or_else(|| {
                Error::bad_model(
                    path,
                    format!(
                        "unsupported architecture `{arch_name}` (supported: {})",
                        Arch::supported_hf()
                    ),
                )
            })?;
        let rope_scaling = match &c.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match kind {
                    // Gemma 3's, read by `rope_scaling_linear`.
                    "linear" if arch == Arch::Gemma3 => None,
                    "llama3" => Some(serde_json::from_value(v.clone()).map_err(|e| {
                        Error::bad_model(path, format!("invalid llama3 rope_scaling: {e}"))
                    })?),
                    "default" | "" => None,
                    other => {
                        return Err(Error::bad_model(
                            path,
                            format!("unsupported rope_scaling type `{other}`"),
                        ))
                    }
                }
            }
        };
        let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let (rope_scaling, gemma) = match arch {
            Arch::Gemma3 => (
                None,
                Some(gemma_from_hf(
                    &c,
                    rope_scaling_linear(&c, path)?,
                    head_dim,
                    path,
                )?),
            ),
            _ => (rope_scaling, None),
        };
        let cfg = ModelConfig {
            arch,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            context_length: c.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(arch == Arch::Gemma3),
            gemma,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Inverse frequencies of the rotary embedding, one per pair of dimensions (of the
    /// global layers, on Gemma 3).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let base = self.inv_freq(self.rope_theta);
        if let Some(g) = &self.gemma {
            return base.iter().map(|f| f / g.rope_linear_factor).collect();
        }
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let low_wavelen = s.original_max_position_embeddings as f32 / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings as f32 / s.high_freq_factor;
        base.into_iter()
            .map(|freq| {
                let wavelen = 2. * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f32 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1. - smooth) * freq / s.factor + smooth * freq
                }
            })
            .collect()
    }

    /// Gemma 3's sliding layers' inverse frequencies; None for other architectures.
    pub fn rope_inv_freq_local(&self) -> Option<Vec<f32>> {
        self.gemma
            .as_ref()
            .map(|g| self.inv_freq(g.local_rope_theta))
    }

    fn inv_freq(&self, theta: f32) -> Vec<f32> {
        let d = self.head_dim;
        (0..d)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / d as f32))
            .collect()
    }

    /// The sliding window of layer `l`, if it has one.
    pub fn window(&self, l: usize) -> Option<usize> {
        let g = self.gemma.as_ref()?;
        g.sliding.get(l).copied()?.then_some(g.sliding_window)
    }
}

/// Gemma 3 puts a global layer after every five sliding ones (llama.cpp and transformers
/// alike, when the file says nothing else).
const GEMMA3_PATTERN: usize = 6;
/// Gemma 3's sliding layers' rotary base, when the file gives none (as llama.cpp).
const GEMMA3_LOCAL_THETA: f32 = 10_000.0;

/// Layer kinds from a pattern: every `pattern`-th layer global, the others sliding.
fn sliding_pattern(layers: usize, pattern: usize) -> Vec<bool> {
    (0..layers)
        .map(|l| pattern == 0 || !(l + 1).is_multiple_of(pattern))
        .collect()
}

/// Gemma 3's parts from GGUF metadata, as llama.cpp reads them: `attention.sliding_window`,
/// `attention.sliding_window_pattern` (a period, or one flag per layer) else every sixth
/// layer global, `rope.scaling.factor` (linear) on the global layers, the sliding layers'
/// base 10000, and the attention scale llama.cpp uses (hidden / heads for the 27B model's
/// 62 layers, the head size otherwise).
fn gemma_from_gguf(
    ct: &gguf_file::Content,
    arch: &str,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    path: &Path,
) -> Result<GemmaConfig> {
    let key = |k: &str| format!("{arch}.{k}");
    let sliding_window = md_u32(ct, &key("attention.sliding_window"), path)? as usize;
    let sliding = match ct.metadata.get(&key("attention.sliding_window_pattern")) {
        None => sliding_pattern(layers, GEMMA3_PATTERN),
        Some(gguf_file::Value::Array(flags)) => flags
            .iter()
            .map(|f| f.to_bool().ok())
            .collect::<Option<Vec<bool>>>()
            .ok_or_else(|| {
                Error::bad_model(
                    path,
                    format!(
                        "GGUF metadata key `{}`: expected booleans",
                        key("attention.sliding_window_pattern")
                    ),
                )
            })?,
        Some(_) => sliding_pattern(
            layers,
            md_u32(ct, &key("attention.sliding_window_pattern"), path)? as usize,
        ),
    };
    let opt_f32 = |k: &str| -> Result<Option<f32>> {
        if ct.metadata.contains_key(&key(k)) {
            md_f32(ct, &key(k), path).map(Some)
        } else {
            Ok(None)
        }
    };
    let scaling = match ct.metadata.get(&key("rope.scaling.type")) {
        Some(v) => v
            .to_string()
            .map(|s| s.as_str())
            .unwrap_or("linear")
            .to_string(),
        None => "linear".into(),
    };
    let factor = opt_f32("rope.scaling.factor")?
        .filter(|f| *f != 0.0)
        .unwrap_or(1.0);
    if scaling != "linear" && scaling != "none" && factor != 1.0 {
        return Err(Error::bad_model(
            path,
            format!("rope scaling `{scaling}` is not supported for gemma3 (only linear)"),
        ));
    }
    let scale_dim = if layers == 62 {
        hidden.checked_div(heads).unwrap_or(head_dim)
    } else {
        head_dim
    };
    Ok(GemmaConfig {
        sliding_window,
        sliding,
        local_rope_theta: opt_f32("rope.local_freq_base")?.unwrap_or(GEMMA3_LOCAL_THETA),
        rope_linear_factor: if scaling == "none" { 1.0 } else { factor },
        attn_scale: 1.0 / (scale_dim.max(1) as f32).sqrt(),
        norm_offset: 0.0,
    })
}

/// A Hugging Face config's linear `rope_scaling` factor (Gemma 3's larger models), 1 without.
fn rope_scaling_linear(c: &HfConfig, path: &Path) -> Result<f32> {
    let Some(v) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
        return Ok(1.0);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match (kind, v.get("factor").and_then(|f| f.as_f64())) {
        ("default", _) => Ok(1.0),
        ("linear", Some(f)) => Ok(f as f32),
        _ => Err(Error::bad_model(
            path,
            format!("unsupported rope_scaling {v} for gemma3 (only linear)"),
        )),
    }
}

/// Gemma 3's parts from config.json: `sliding_window`, `layer_types` (else
/// `sliding_window_pattern`, else every sixth layer global), `rope_local_base_freq`,
/// `query_pre_attn_scalar`; norms stored without their 1. Logit soft-capping (Gemma 2's) is
/// refused.
fn gemma_from_hf(c: &HfConfig, factor: f32, head_dim: usize, path: &Path) -> Result<GemmaConfig> {
    let g = &c.gemma;
    if g.final_logit_softcapping.is_some() || g.attn_logit_softcapping.is_some() {
        return Err(Error::bad_model(
            path,
            "logit soft-capping (final_logit_softcapping, attn_logit_softcapping) is not supported",
        ));
    }
    if let Some(act) = g.hidden_activation.as_deref() {
        if act != "gelu_pytorch_tanh" && act != "gelu" {
            return Err(Error::bad_model(
                path,
                format!(
                    "hidden_activation `{act}` is not supported for gemma3 (gelu_pytorch_tanh)"
                ),
            ));
        }
    }
    let sliding = match &g.layer_types {
        Some(kinds) => kinds
            .iter()
            .map(|k| match k.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(Error::bad_model(
                    path,
                    format!("unknown layer type `{other}`"),
                )),
            })
            .collect::<Result<Vec<bool>>>()?,
        None => sliding_pattern(
            c.num_hidden_layers,
            g.sliding_window_pattern.unwrap_or(GEMMA3_PATTERN),
        ),
    };
    Ok(GemmaConfig {
        sliding_window: g.sliding_window.unwrap_or(4096),
        sliding,
        local_rope_theta: g.rope_local_base_freq.unwrap_or(GEMMA3_LOCAL_THETA),
        rope_linear_factor: factor,
        attn_scale: 1.0 / (g.query_pre_attn_scalar.unwrap_or(head_dim).max(1) as f32).sqrt(),
        norm_offset: 1.0,
    })
}

/// config.json keys only Gemma 3 has.
#[derive(Deserialize, Default)]
struct HfGemma {
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
    query_pre_attn_scalar: Option<usize>,
    hidden_activation: Option<String>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    #[serde(flatten)]
    gemma: HfGemma,
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str, path: &Path) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::bad_model(path, format!("missing GGUF metadata key `{key}`")))
}

/// Names the type found, not the value (which may be a megabyte-long array).
fn wrong_type(path: &Path, key: &str, v: &gguf_file::Value, expected: &str) -> Error {
    Error::bad_model(
        path,
        format!(
            "GGUF metadata key `{key}`: expected {expected}, found {:?}",
            v.value_type()
        ),
    )
}

pub(crate) fn md_u32(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<u32> {
    use gguf_file::Value as V;
    let v = md(ct, key, path)?;
    // Writers differ on integer widths; accept any whose value fits.
    let wide: i128 = match *v {
        V::U8(x) => x.into(),
        V::I8(x) => x.into(),
        V::U16(x) => x.into(),
        V::I16(x) => x.into(),
        V::U32(x) => x.into(),
        V::I32(x) => x.into(),
        V::U64(x) => x.into(),
        V::I64(x) => x.into(),
        _ => return Err(wrong_type(path, key, v, "an integer")),
    };
    u32::try_from(wide).map_err(|_| {
        Error::bad_model(
            path,
            format!("GGUF metadata key `{key}`: {wide} is out of range"),
        )
    })
}

pub(crate) fn md_f32(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<f32> {
    let v = md(ct, key, path)?;
    v.to_f32()
        .or_else(|_| v.to_f64().map(|x| x as f32))
        .map_err(|_| wrong_type(path, key, v, "a float"))
}

pub(crate) fn md_string(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<String> {
    let v = md(ct, key, path)?;
    v.to_string()
        .cloned()
        .map_err(|_| wrong_type(path, key, v, "a string"))
}

pub(crate) fn tensor_dims(ct: &gguf_file::Content, name: &str, path: &Path) -> Result<Vec<usize>> {
    ct.tensor_infos
        .get(name)
        .map(|t| t.shape.dims().to_vec())
        .ok_or_else(|| Error::bad_model(path, format!("missing tensor `{name}`")))
}
