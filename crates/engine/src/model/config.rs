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
}

/// Every architecture, with its GGUF name (`general.architecture`) and the Hugging Face
/// class names (`architectures` in config.json) read as it.
const ARCHS: [(Arch, &str, &[&str]); 3] = [
    (
        Arch::Llama,
        "llama",
        &["LlamaForCausalLM", "MistralForCausalLM"],
    ),
    (Arch::Qwen2, "qwen2", &["Qwen2ForCausalLM"]),
    (Arch::Qwen3, "qwen3", &["Qwen3ForCausalLM"]),
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
        }
    }

    /// Whether each head of q and k goes through an RMS norm of its own before the rotary
    /// embedding.
    pub fn qk_norm(&self) -> bool {
        *self == Arch::Qwen3
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
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: md_f32(ct, &key("attention.layer_norm_rms_epsilon"), path)? as f64,
            rope_theta: md_f32(ct, &key("rope.freq_base"), path).unwrap_or(10_000.0),
            rope_scaling: None,
            context_length: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
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
        let rope_scaling = match c.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match kind {
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
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Inverse frequencies of the rotary embedding, one per pair of dimensions.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
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
