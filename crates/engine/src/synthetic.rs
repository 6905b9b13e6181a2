//! Random-weight models of real shapes, written as GGUF: a model of Qwen2.5-Coder-7B's shape in
//! Q4_K_M can be measured on a machine that has none of its weights, and tests get tiny models
//! with whatever vocabulary they need. The weights are random (deterministic per seed), so the
//! text is noise; shapes, tensor types, and so speed, are the real model's.
//!
//! The tokenizer is byte-level BPE without merges: `<|endoftext|>`, `<|im_start|>`,
//! `<|im_end|>`, the 256 bytes, Qwen2.5-Coder's fill-in-the-middle tokens, then filler tokens
//! up to the vocabulary size. The chat template is ChatML.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::chat::CHATML_TEMPLATE;
use crate::error::{ConfigError, Error, Result};

/// A model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// `llama`, `qwen2` (q/k/v biases) or `qwen3` (per-head q/k norms, a head size of its
    /// own).
    pub arch: &'static str,
    pub hidden: usize,
    pub heads: usize,
    /// The head size where it is not `hidden / heads` (qwen3).
    pub head_dim: Option<usize>,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub context: usize,
    pub vocab: usize,
    /// The embedding table is also the output matrix.
    pub tied: bool,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

/// The shapes `preset` knows, by name.
pub const PRESETS: [&str; 11] = [
    "tiny",
    "tiny-qwen3",
    "smollm2-135m",
    "qwen2.5-coder-0.5b",
    "qwen2.5-coder-1.5b",
    "qwen2.5-coder-3b",
    "qwen2.5-coder-7b",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
];

/// Tokens before the filler: three specials, 256 bytes, three FIM tokens.
const FIXED_TOKENS: usize = 3 + 256 + 3;

/// A real model's shape (from its config.json), or `tiny` (for tests).
pub fn preset(name: &str) -> Option<Shape> {
    let qwen2 = |hidden, heads, kv_heads, intermediate, layers, vocab, tied| Shape {
        arch: "qwen2",
        hidden,
        heads,
        head_dim: None,
        kv_heads,
        intermediate,
        layers,
        context: 32768,
        vocab,
        tied,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
    };
    // Qwen3's dense models: head size 128 whatever the width, 40960 positions.
    let qwen3 = |hidden, heads, kv_heads, intermediate, layers, tied| Shape {
        arch: "qwen3",
        head_dim: Some(128),
        context: 40960,
        ..qwen2(hidden, heads, kv_heads, intermediate, layers, 151_936, tied)
    };
    Some(match name {
        "tiny" => Shape {
            context: 512,
            ..qwen2(64, 4, 2, 128, 2, FIXED_TOKENS + 2, true)
        },
        "tiny-qwen3" => Shape {
            arch: "qwen3",
            head_dim: Some(32),
            context: 512,
            ..qwen2(64, 4, 2, 128, 2, FIXED_TOKENS + 2, true)
        },
        "smollm2-135m" => Shape {
            arch: "llama",
            context: 8192,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            ..qwen2(576, 9, 3, 1536, 30, 49152, true)
        },
        "qwen2.5-coder-0.5b" => qwen2(896, 14, 2, 4864, 24, 151_936, true),
        "qwen2.5-coder-1.5b" => qwen2(1536, 12, 2, 8960, 28, 151_936, true),
        "qwen2.5-coder-3b" => qwen2(2048, 16, 2, 11008, 36, 151_936, true),
        "qwen2.5-coder-7b" => qwen2(3584, 28, 4, 18944, 28, 152_064, false),
        "qwen3-0.6b" => qwen3(1024, 16, 8, 3072, 28, true),
        "qwen3-1.7b" => qwen3(2048, 16, 8, 6144, 28, true),
        "qwen3-4b" => qwen3(2560, 32, 8, 9728, 36, true),
        "qwen3-8b" => qwen3(4096, 32, 8, 12288, 36, false),
        _ => return None,
    })
}

/// A quantization as llama.cpp's `llama-quantize` names it: `F32`, `F16`, `Q4_0`, `Q4_1`,
/// `Q5_0`, `Q5_1`, `Q8_0`, `Q2_K`..`Q6_K`, `Q4_K_M` (Q4_K with the output matrix in Q6_K),
/// `Q5_K_M` (Q5_K, output Q6_K). Returns the matrices' type and the output matrix's.
pub fn quant(name: &str) -> Option<(GgmlDType, GgmlDType)> {
    use GgmlDType as T;
    let one = |t| Some((t, t));
    match name.to_ascii_uppercase().as_str() {
        "F32" => one(T::F32),
        "F16" => one(T::F16),
        "Q4_0" => one(T::Q4_0),
        "Q4_1" => one(T::Q4_1),
        "Q5_0" => one(T::Q5_0),
        "Q5_1" => one(T::Q5_1),
        "Q8_0" => one(T::Q8_0),
        "Q2_K" => one(T::Q2K),
        "Q3_K" => one(T::Q3K),
        "Q4_K" => one(T::Q4K),
        "Q5_K" => one(T::Q5K),
        "Q6_K" => one(T::Q6K),
        "Q4_K_M" => Some((T::Q4K, T::Q6K)),
        "Q5_K_M" => Some((T::Q5K, T::Q6K)),
        _ => None,
    }
}

/// The type a matrix with rows of `cols` values gets: `want`, or where its blocks do not
/// divide the rows, what llama.cpp falls back to.
fn fitting(want: GgmlDType, cols: usize) -> GgmlDType {
    use GgmlDType as T;
    if cols.is_multiple_of(want.block_size()) {
        return want;
    }
    let fallback = match want {
        T::Q2K | T::Q3K => T::Q4_0,
        T::Q4K => T::Q5_0,
        T::Q5K => T::Q5_1,
        _ => T::Q8_0,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        T::F16
    }
}

/// SplitMix64 and Box-Muller: deterministic, and independent of any crate's version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// GPT-2's byte-level alphabet: byte `b` as the character that stands for it.
fn byte_char(b: u8) -> char {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let b = u32::from(b);
    if printable(b) {
        return char::from_u32(b).unwrap_or('?');
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

fn tokenizer_metadata(shape: &Shape) -> Result<Vec<(String, Value)>> {
    if shape.vocab < FIXED_TOKENS {
        return Err(ConfigError::Synthetic(format!(
            "a synthetic model needs a vocabulary of at least {FIXED_TOKENS} tokens, not {}",
            shape.vocab
        ))
        .into());
    }
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    tokens.extend(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"].map(String::from));
    let filler = shape.vocab - tokens.len();
    tokens.extend((0..filler).map(|i| format!("<|filler_{i}|>")));
    let control = |i: usize| i < 3 || (3 + 256..FIXED_TOKENS).contains(&i);
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if control(i) { 3 } else { 1 }))
        .collect();
    let s = |x: &str| Value::String(x.to_string());
    Ok(vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        (
            "tokenizer.ggml.pre".into(),
            s(if shape.arch == "llama" {
                "smollm"
            } else {
                "qwen2"
            }),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(CHATML_TEMPLATE)),
    ])
}

/// Writes a random-weight model of `shape` to `path` as GGUF, its matrices in `quant` (see
/// `quant`), 1-D tensors in F32; `seed` decides the weights. Tensors are made and quantized
/// one at a time; the file holds what the quantized model needs.
pub fn write_gguf(shape: &Shape, quant_name: &str, seed: u64, path: &Path) -> Result<()> {
    let (matrix, output) = quant(quant_name).ok_or_else(|| {
        Error::from(ConfigError::Synthetic(format!(
            "unknown quantization `{quant_name}` (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q4_K_M, Q5_K_M)"
        )))
    })?;
    let s = shape;
    let head_dim_ok = s.head_dim.is_some() || s.hidden.is_multiple_of(s.heads.max(1));
    if s.heads == 0 || s.kv_heads == 0 || !head_dim_ok || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(ConfigError::Synthetic(format!(
            "a shape needs heads dividing hidden ({}) or a head size, and kv heads dividing heads ({} / {})",
            s.hidden, s.heads, s.kv_heads
        ))
        .into());
    }
    let a = s.arch;
    let d = s.head_dim.unwrap_or(s.hidden / s.heads);
    let u = |k: &str, v: usize| (format!("{a}.{k}"), Value::U32(v as u32));
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        (
            "general.name".to_string(),
            Value::String(format!("synthetic {a}")),
        ),
        u("context_length", s.context),
        u("embedding_length", s.hidden),
        u("block_count", s.layers),
        u("feed_forward_length", s.intermediate),
        u("attention.head_count", s.heads),
        u("attention.head_count_kv", s.kv_heads),
        u("rope.dimension_count", d),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(s.rms_eps),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(s.rope_theta)),
    ];
    if s.head_dim.is_some() {
        md.push(u("attention.key_length", d));
        md.push(u("attention.value_length", d));
    }
    md.extend(tokenizer_metadata(s)?);

    let mut rng = Rng(seed);
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add =
        |name: String, shape: &[usize], mean: f32, std: f32, ty: GgmlDType| -> Result<()> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
            let t = Tensor::from_vec(v, shape, &dev)?;
            let ty = if shape.len() == 1 {
                GgmlDType::F32
            } else {
                fitting(ty, shape[shape.len() - 1])
            };
            tensors.push((name, QTensor::quantize(&t, ty)?));
            Ok(())
        };
    let (h, i, q, kv) = (s.hidden, s.intermediate, s.heads * d, s.kv_heads * d);
    let std = 0.02f32;
    let embd_ty = if s.tied { output } else { matrix };
    add(
        "token_embd.weight".into(),
        &[s.vocab, h],
        0.0,
        2.0 * std,
        embd_ty,
    )?;
    for l in 0..s.layers {
        let p = |rest: &str| format!("blk.{l}.{rest}");
        add(p("attn_norm.weight"), &[h], 1.0, 0.1, matrix)?;
        add(p("attn_q.weight"), &[q, h], 0.0, std, matrix)?;
        add(p("attn_k.weight"), &[kv, h], 0.0, std, matrix)?;
        add(p("attn_v.weight"), &[kv, h], 0.0, std, matrix)?;
        if a == "qwen2" {
            add(p("attn_q.bias"), &[q], 0.0, 0.2, matrix)?;
            add(p("attn_k.bias"), &[kv], 0.0, 0.2, matrix)?;
            add(p("attn_v.bias"), &[kv], 0.0, 0.2, matrix)?;
        }
        if a == "qwen3" {
            add(p("attn_q_norm.weight"), &[d], 1.0, 0.1, matrix)?;
            add(p("attn_k_norm.weight"), &[d], 1.0, 0.1, matrix)?;
        }
        add(p("attn_output.weight"), &[h, q], 0.0, std, matrix)?;
        add(p("ffn_norm.weight"), &[h], 1.0, 0.1, matrix)?;
        add(p("ffn_gate.weight"), &[i, h], 0.0, std, matrix)?;
        add(p("ffn_up.weight"), &[i, h], 0.0, std, matrix)?;
        add(p("ffn_down.weight"), &[h, i], 0.0, std, matrix)?;
    }
    add("output_norm.weight".into(), &[h], 1.0, 0.1, matrix)?;
    if !s.tied {
        add("output.weight".into(), &[s.vocab, h], 0.0, std, output)?;
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let io = |e: std::io::Error| {
        Error::from(ConfigError::Synthetic(format!(
            "cannot write {}: {e}",
            path.display()
        )))
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    f.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_quantizations_are_named() {
        for name in PRESETS {
            let s = preset(name).unwrap();
            assert!(
                s.head_dim.is_some() || s.hidden.is_multiple_of(s.heads),
                "{name}"
            );
        }
        assert!(preset("gpt-5").is_none());
        assert_eq!(quant("q4_k_m"), Some((GgmlDType::Q4K, GgmlDType::Q6K)));
        assert!(quant("Q9").is_none());
        // 576-wide rows do not fit 256-value K blocks: llama.cpp's fallback.
        assert_eq!(fitting(GgmlDType::Q4K, 576), GgmlDType::Q5_0);
        assert_eq!(fitting(GgmlDType::Q4K, 512), GgmlDType::Q4K);
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
    }

    /// Each architecture's tiny model loads as that architecture, with its head size, its
    /// tokenizer's FIM tokens and its template, and generates.
    #[test]
    fn tiny_synthetic_models_load_and_generate() {
        use crate::registry::{Format, ModelLocation};
        use crate::scheduler::{GenerateRequest, LlmClient, Prompt, SchedulerConfig};
        for (name, arch, head_dim) in [("tiny", "qwen2", 16), ("tiny-qwen3", "qwen3", 32)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            write_gguf(&preset(name).unwrap(), "Q8_0", 1, &path).unwrap();
            let loc = ModelLocation {
                name: name.into(),
                format: Format::Gguf,
                path,
                chat_template: None,
                recipe: Default::default(),
            };
            let m = crate::loader::load(&loc, &Device::Cpu).unwrap();
            assert_eq!(m.info.architecture, arch);
            assert_eq!(m.model.config().head_dim, head_dim, "{name}");
            assert!(m.tokenizer.fim_tokens().is_some());
            let client = LlmClient::start(vec![m], SchedulerConfig::default()).unwrap();
            let mut req = GenerateRequest::new(Prompt::Text("def f(x):".into()), 4);
            req.ignore_eos = true;
            let rt = tokio::runtime::Runtime::new().unwrap();
            let done = rt
                .block_on(client.generate(req).unwrap().collect())
                .unwrap();
            assert_eq!(done.tokens.len(), 4, "{name}");
        }
    }
}
