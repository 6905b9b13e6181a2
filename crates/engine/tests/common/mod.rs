//! Tiny random-weight llama / qwen2 / qwen3 / gemma3 models that tests write themselves: GGUF (any tensor type
//! candle writes) and Hugging Face safetensors directories (f32 / f16 / bf16, one file or
//! shards), each with a small byte-level BPE tokenizer. Nothing is downloaded.
//!
//! A model is generated once in Hugging Face layout (f32, deterministic). Safetensors get it
//! as is; GGUF gets llama.cpp's names and, for llama, q/k rows permuted exactly as llama.cpp's
//! `convert_hf_to_gguf.py` does (`LlamaModel.permute`), so that files look like real ones.

#![allow(dead_code)] // each test crate that includes this module uses part of it

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

/// The tiny gemma3 models' layer pattern: every second layer global (Gemma 3's own is every
/// sixth), so that three layers have both kinds.
pub const GEMMA3_PATTERN: usize = 2;
/// Gemma 3's sliding layers' rotary base.
pub const GEMMA3_LOCAL_THETA: f32 = 10_000.0;

impl Arch {
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    pub fn rope_theta(self) -> f32 {
        match self {
            Arch::Llama => 10_000.0,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => 1_000_000.0,
        }
    }

    pub fn rms_norm_eps(self) -> f32 {
        match self {
            Arch::Llama => 1e-5,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => 1e-6,
        }
    }

    /// `tokenizer.ggml.pre`: Qwen3's tokenizer is Qwen2's (gemma3's tiny models use it too:
    /// the tokenizer is not what they test).
    pub fn pre_tokenizer(self) -> &'static str {
        match self {
            Arch::Llama => "smollm",
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => "qwen2",
        }
    }

    /// Whether the model has a head size of its own (qwen3's and gemma3's `head_dim`).
    fn own_head_dim(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }
}

/// The shape of a tiny model. The head size is `hidden / heads` (what candle-transformers'
/// llama and qwen2 assume) unless `key_length` sets one (qwen3's `head_dim`).
#[derive(Clone, Debug)]
pub struct Spec {
    pub arch: Arch,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// A head size of its own (qwen3 only): GGUF `attention.key_length`, HF `head_dim`.
    pub key_length: Option<usize>,
    pub intermediate: usize,
    pub layers: usize,
    pub context: usize,
    /// No separate output matrix: the embedding table is the LM head.
    pub tied: bool,
    /// Standard deviation of the matrix entries.
    pub std: f32,
    pub seed: u64,
    /// gemma3's sliding window: positions a sliding layer's query sees, its own included.
    pub window: usize,
}

impl Spec {
    /// hidden 64, 4 heads over 2 kv heads (GQA), head_dim 16, 3 layers; qwen3's head_dim is
    /// 32, twice hidden / heads (as Qwen3-0.6B's 128 against 1024 / 16), and its LM head tied.
    pub fn small(arch: Arch) -> Self {
        Spec {
            arch,
            hidden: 64,
            heads: 4,
            // Gemma 3 270M's one kv head (candle's gemma3, the reference, appends to its
            // cache a tensor that is contiguous only with one).
            kv_heads: if arch == Arch::Gemma3 { 1 } else { 2 },
            key_length: arch.own_head_dim().then_some(32),
            intermediate: 128,
            layers: 3,
            context: 256,
            tied: arch != Arch::Llama,
            std: 0.15,
            seed: 0x5eed + arch as u64,
            window: 256,
        }
    }

    /// Every matrix's inner dimension a multiple of 256, as the K-quants need: hidden 256,
    /// 8 heads over 2 kv heads (head_dim 32), intermediate 512, 2 layers. qwen3 states its
    /// head_dim (32, here hidden / heads, as Qwen3-8B's) and has an LM head of its own.
    pub fn for_k_quants(arch: Arch) -> Self {
        Spec {
            arch,
            hidden: 256,
            heads: 8,
            kv_heads: if arch == Arch::Gemma3 { 1 } else { 2 },
            key_length: arch.own_head_dim().then_some(32),
            intermediate: 512,
            layers: 2,
            context: 256,
            tied: matches!(arch, Arch::Qwen2 | Arch::Gemma3),
            std: 0.08,
            seed: 0xc0ffee + arch as u64,
            window: 256,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.key_length.unwrap_or(self.hidden / self.heads)
    }
}

/// SplitMix64: a deterministic generator that does not depend on any crate's version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }

    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab as u32)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer: 3 control tokens, the 256 byte tokens of GPT-2's byte-level BPE, 41 merges.

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Fill-in-the-middle tokens (Qwen2.5-Coder's), control tokens at the end of the vocabulary.
pub const FIM_TOKENS: [&str; 3] = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"];

const MERGES: [&str; 41] = [
    "Ġ t",
    "h e",
    "i n",
    "r e",
    "o n",
    "Ġt he",
    "e r",
    "Ġ s",
    "a t",
    "Ġ w",
    "Ġ o",
    "e n",
    "Ġ c",
    "i t",
    "i s",
    "a n",
    "o r",
    "e s",
    "Ġ b",
    "e d",
    "Ġ f",
    "in g",
    "Ġ p",
    "o u",
    "Ġ a",
    "a l",
    "a r",
    "Ġ d",
    "d e",
    "Ġd e",
    "Ġde f",
    "Ġ r",
    "Ġr e",
    "t u",
    "Ġre tu",
    "r n",
    "Ġretu rn",
    "Ġ (",
    "Ġ =",
    "Ċ Ċ",
    "Ġ Ġ",
];

/// GPT-2's byte → printable char table.
pub fn byte_chars() -> Vec<char> {
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let c = if printable {
                b
            } else {
                n += 1;
                255 + n
            };
            char::from_u32(c).unwrap()
        })
        .collect()
}

/// The vocabulary, in id order (303 tokens: the FIM tokens last).
pub fn vocab() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIAL_TOKENS.map(String::from).to_vec();
    tokens.extend(byte_chars().into_iter().map(String::from));
    for m in MERGES {
        let (l, r) = m.split_once(' ').unwrap();
        assert!(
            tokens.iter().any(|t| t == l) && tokens.iter().any(|t| t == r),
            "merge `{m}` of unknown parts"
        );
        tokens.push(format!("{l}{r}"));
    }
    tokens.extend(FIM_TOKENS.map(String::from));
    tokens
}

/// `tokenizer.ggml.*` metadata for the tiny vocabulary.
pub fn tokenizer_metadata(pre: &str) -> Vec<(String, Value)> {
    let tokens = vocab();
    let s = |x: &str| Value::String(x.to_string());
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| {
            let control = i < SPECIAL_TOKENS.len() || i >= tokens.len() - FIM_TOKENS.len();
            Value::I32(if control { 3 } else { 1 })
        })
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(MERGES.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

/// Writes tokenizer.json and tokenizer_config.json for the tiny vocabulary into `dir`.
pub fn write_hf_tokenizer(dir: &Path, pre: &str) {
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: tokenizer_metadata(pre).into_iter().collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    let tok =
        forgeline_engine::tokenizer::Tokenizer::from_gguf(&content, Path::new("tiny")).unwrap();
    tok.hf().save(dir.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Weights.

/// A generated model: its spec and its tensors in Hugging Face layout and naming, f32.
pub struct TinyModel {
    pub spec: Spec,
    pub vocab_size: usize,
    pub tensors: Vec<(String, Tensor)>,
}

impl TinyModel {
    pub fn new(spec: Spec) -> Self {
        let vocab_size = vocab().len();
        let mut rng = Rng::new(spec.seed);
        let (h, i, d) = (spec.hidden, spec.intermediate, spec.head_dim());
        let (q, kv) = (spec.heads * d, spec.kv_heads * d);
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: &[usize], mean: f32, std: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            tensors.push((name, t));
        };
        let std = spec.std;
        // Embedding entries twice the matrices': a tied LM head then gives logits of order 1.
        add(
            "model.embed_tokens.weight".into(),
            &[vocab_size, h],
            0.0,
            2.0 * std,
        );
        // Gemma's norms are stored as w with x * (1 + w) meant.
        let norm_mean = if spec.arch == Arch::Gemma3 { 0.0 } else { 1.0 };
        for l in 0..spec.layers {
            let p = |rest: &str| format!("model.layers.{l}.{rest}");
            add(p("input_layernorm.weight"), &[h], norm_mean, 0.1);
            add(p("self_attn.q_proj.weight"), &[q, h], 0.0, std);
            add(p("self_attn.k_proj.weight"), &[kv, h], 0.0, std);
            add(p("self_attn.v_proj.weight"), &[kv, h], 0.0, std);
            if spec.arch == Arch::Qwen2 {
                add(p("self_attn.q_proj.bias"), &[q], 0.0, 0.2);
                add(p("self_attn.k_proj.bias"), &[kv], 0.0, 0.2);
                add(p("self_attn.v_proj.bias"), &[kv], 0.0, 0.2);
            }
            if spec.arch.own_head_dim() {
                add(p("self_attn.q_norm.weight"), &[d], norm_mean, 0.2);
                add(p("self_attn.k_norm.weight"), &[d], norm_mean, 0.2);
            }
            add(p("self_attn.o_proj.weight"), &[h, q], 0.0, std);
            // Gemma: after attention; the others: before the feed-forward block.
            add(p("post_attention_layernorm.weight"), &[h], norm_mean, 0.1);
            if spec.arch == Arch::Gemma3 {
                add(p("pre_feedforward_layernorm.weight"), &[h], 0.0, 0.1);
                add(p("post_feedforward_layernorm.weight"), &[h], 0.0, 0.1);
            }
            add(p("mlp.gate_proj.weight"), &[i, h], 0.0, std);
            add(p("mlp.up_proj.weight"), &[i, h], 0.0, std);
            add(p("mlp.down_proj.weight"), &[h, i], 0.0, std);
        }
        add("model.norm.weight".into(), &[h], norm_mean, 0.1);
        if !spec.tied {
            add("lm_head.weight".into(), &[vocab_size, h], 0.0, std);
        }
        TinyModel {
            spec,
            vocab_size,
            tensors,
        }
    }

    // --- GGUF --------------------------------------------------------------------------------

    pub fn gguf_metadata(&self) -> Vec<(String, Value)> {
        let s = &self.spec;
        let a = s.arch.gguf_name();
        let u = |k: &str, v: usize| (format!("{a}.{k}"), Value::U32(v as u32));
        let mut md = vec![
            ("general.architecture".to_string(), Value::String(a.into())),
            ("general.name".to_string(), Value::String("tiny".into())),
            u("context_length", s.context),
            u("embedding_length", s.hidden),
            u("block_count", s.layers),
            u("feed_forward_length", s.intermediate),
            u("attention.head_count", s.heads),
            u("attention.head_count_kv", s.kv_heads),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(s.arch.rms_norm_eps()),
            ),
            (
                format!("{a}.rope.freq_base"),
                Value::F32(s.arch.rope_theta()),
            ),
        ];
        if s.arch == Arch::Gemma3 {
            md.push(u("attention.key_length", s.head_dim()));
            md.push(u("attention.value_length", s.head_dim()));
            md.push(u("attention.sliding_window", s.window));
            md.push(u("attention.sliding_window_pattern", GEMMA3_PATTERN));
        } else if s.arch == Arch::Qwen3 {
            // As llama.cpp's converter writes a model with `head_dim` in its config: key and
            // value lengths, no rope.dimension_count (the rotary embedding spans the head).
            md.push(u("attention.key_length", s.head_dim()));
            md.push(u("attention.value_length", s.head_dim()));
            // Not a llama.cpp key: candle's quantized_qwen3 (the reference) reads it for its
            // compute dtype, and without it builds its rotary table in f16, which moves its
            // logits by 5e-3 here, fifty times the exact tolerance. 0 is f32. forgeline
            // ignores it.
            md.push(("general.dtype".into(), Value::U32(0)));
        } else {
            md.push(u("rope.dimension_count", s.head_dim()));
        }
        md.extend(tokenizer_metadata(s.arch.pre_tokenizer()));
        md
    }

    /// The tensors as a GGUF converter writes them: llama.cpp names, llama q/k rows permuted
    /// for the interleaved rotary convention, matrices in `dtype`, 1-D tensors in F32.
    pub fn gguf_tensors(&self, dtype: GgmlDType) -> Vec<(String, QTensor)> {
        let s = &self.spec;
        let d = s.head_dim();
        self.tensors
            .iter()
            .map(|(hf_name, t)| {
                let name = gguf_name_of(s.arch, hf_name);
                let t = match (s.arch, hf_name) {
                    // llama.cpp's converter adds Gemma's 1 to its norms.
                    (Arch::Gemma3, n) if n.ends_with("norm.weight") => (t + 1.0).unwrap(),
                    (Arch::Llama, n) if n.ends_with("q_proj.weight") => {
                        llama_cpp_permute(t, s.heads, d)
                    }
                    (Arch::Llama, n) if n.ends_with("k_proj.weight") => {
                        llama_cpp_permute(t, s.kv_heads, d)
                    }
                    _ => t.clone(),
                };
                let ty = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
                (name, QTensor::quantize(&t, ty).unwrap())
            })
            .collect()
    }

    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) {
        write_gguf(path, &self.gguf_metadata(), &self.gguf_tensors(dtype));
    }

    // --- safetensors -------------------------------------------------------------------------

    pub fn hf_config(&self) -> serde_json::Value {
        let s = &self.spec;
        let mut c = serde_json::json!({
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": s.arch.rms_norm_eps(),
            "rope_theta": s.arch.rope_theta(),
            "max_position_embeddings": s.context,
            "tie_word_embeddings": s.tied,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        let extra = match s.arch {
            Arch::Llama => serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
            }),
            Arch::Qwen2 => serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "sliding_window": s.context,
                "max_window_layers": s.layers,
                "use_sliding_window": false,
            }),
            Arch::Gemma3 => serde_json::json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "head_dim": s.head_dim(),
                "attention_bias": false,
                "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": s.head_dim(),
                "sliding_window": s.window,
                "sliding_window_pattern": GEMMA3_PATTERN,
                "rope_local_base_freq": GEMMA3_LOCAL_THETA,
                "final_logit_softcapping": null,
                "attn_logit_softcapping": null,
            }),
            Arch::Qwen3 => serde_json::json!({
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                "head_dim": s.head_dim(),
                "attention_bias": false,
                "sliding_window": null,
                "max_window_layers": s.layers,
                "use_sliding_window": false,
            }),
        };
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    /// Writes a Hugging Face model directory: config.json, tokenizer files and the weights in
    /// `dtype`, in one file or in `shards` files with a model.safetensors.index.json.
    /// Returns the safetensors files written.
    pub fn write_safetensors(&self, dir: &Path, dtype: DType, shards: usize) -> Vec<PathBuf> {
        std::fs::create_dir_all(dir).unwrap();
        let mut cfg = self.hf_config();
        cfg["torch_dtype"] = format!("{dtype:?}")
            .to_lowercase()
            .replace("f", "float")
            .into();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&cfg).unwrap(),
        )
        .unwrap();
        write_hf_tokenizer(dir, self.spec.arch.pre_tokenizer());
        let tensors: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        write_safetensors(dir, &tensors, shards)
    }
}

/// Writes `tensors` into `dir` as one model.safetensors, or as `shards` consecutive pieces
/// with an index as `transformers` writes them.
pub fn write_safetensors(dir: &Path, tensors: &[(String, Tensor)], shards: usize) -> Vec<PathBuf> {
    if shards <= 1 {
        let p = dir.join("model.safetensors");
        let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        return vec![p];
    }
    let per = tensors.len().div_ceil(shards);
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (k, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        for (n, t) in chunk {
            weight_map.insert(n.clone(), file.clone().into());
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        let p = dir.join(&file);
        candle_core::safetensors::save(&map, &p).unwrap();
        files.push(p);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    files
}

pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

/// llama.cpp's name of a Hugging Face tensor of an `arch` model: Gemma's norms around its
/// layers are named apart.
pub fn gguf_name_of(arch: Arch, hf: &str) -> String {
    if arch == Arch::Gemma3 {
        for (from, to) in [
            ("post_attention_layernorm.", "post_attention_norm."),
            ("pre_feedforward_layernorm.", "ffn_norm."),
            ("post_feedforward_layernorm.", "post_ffw_norm."),
        ] {
            if let Some((head, tail)) = hf.split_once(from) {
                let l = head
                    .strip_prefix("model.layers.")
                    .unwrap()
                    .trim_end_matches('.');
                return format!("blk.{l}.{to}{tail}");
            }
        }
    }
    gguf_name(hf)
}

/// llama.cpp's name of a Hugging Face tensor.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let m = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{l}.{m}.{kind}")
}

/// llama.cpp's `permute(weights, n_head, n_head_kv)` of convert_hf_to_gguf.py:
/// `w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)`.
/// Within each head, row `s * head_dim / 2 + j` moves to row `2 * j + s`.
pub fn llama_cpp_permute(w: &Tensor, n_head: usize, head_dim: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    assert_eq!(rows, n_head * head_dim);
    w.reshape((n_head, 2, head_dim / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}
