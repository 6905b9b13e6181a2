//! The real Gemma 3 270M (Q4_K_M GGUF, `scripts/fetch-model gemma-3-270m`) against
//! candle-transformers' gemma3 over the same weights: one forward over a mixed batch (a
//! sequence longer than the 512-position sliding window, and a short one), each sequence's
//! last logits against the reference run on it alone.
//!
//! The reference is candle's `gemma3` (not `quantized_gemma3`, whose feed-forward computes
//! SiLU where Gemma computes GELU) built from the file's tensors dequantized to f32, under
//! their Hugging Face names, norms without the 1 llama.cpp's converter adds. candle lets a
//! sliding layer's query see one position more than Gemma does, so it is given a window one
//! shorter. forgeline multiplies by the quantized weights, the reference by their f32
//! values: the logits agree as quantized models do (total variation, same greedy token),
//! not to the last digit. Skipped, saying so, without the model file.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::gemma3;
use forgeline_engine::kv_cache::{BlockTable, KvCache};
use forgeline_engine::loader::load;
use forgeline_engine::model::SeqInput;
use forgeline_engine::registry::{Format, ModelLocation};

fn gemma_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf")
}

/// Hugging Face's name of a llama.cpp gemma3 tensor.
fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").expect(gguf);
    let (l, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let m = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("no Hugging Face name for {other}"),
    };
    format!("model.layers.{l}.{m}.{kind}")
}

fn softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = xs.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn argmax(xs: &[f32]) -> usize {
    (0..xs.len())
        .max_by(|&a, &b| xs[a].total_cmp(&xs[b]))
        .unwrap()
}

#[test]
fn gemma3_270m_matches_candles_gemma3_on_a_mixed_batch() {
    let path = gemma_path();
    if !path.exists() {
        println!("SKIPPED: run scripts/fetch-model gemma-3-270m");
        return;
    }
    let dev = Device::Cpu;
    let m = load(
        &ModelLocation {
            name: "gemma-3-270m".into(),
            path: path.clone(),
            format: Format::Gguf,
            chat_template: None,
            recipe: Default::default(),
        },
        &dev,
    )
    .unwrap();
    let c = m.model.config().clone();
    let g = c.gemma.clone().expect("gemma3's parts");
    assert_eq!(c.arch.as_str(), "gemma3");
    assert_eq!((c.num_layers, c.head_dim, c.num_kv_heads), (18, 256, 1));
    assert_eq!(g.sliding_window, 512);
    // Every sixth layer global.
    let globals: Vec<usize> = (0..c.num_layers).filter(|&l| !g.sliding[l]).collect();
    assert_eq!(globals, [5, 11, 17]);

    // The reference, from the same file.
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    let mut tensors = HashMap::new();
    for name in names {
        let t = ct
            .tensor(&mut f, &name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let t = if name.ends_with("norm.weight") {
            (t - 1.0).unwrap()
        } else {
            t
        };
        tensors.insert(hf_name(&name), t);
    }
    let cfg: gemma3::Config = serde_json::from_value(serde_json::json!({
        "attention_bias": false,
        "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "num_key_value_heads": c.num_kv_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_local_base_freq": g.local_rope_theta,
        "vocab_size": c.vocab_size,
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "query_pre_attn_scalar": c.head_dim,
        "sliding_window": g.sliding_window - 1,
        "sliding_window_pattern": 6,
        // Rotary tables for the positions used, not the model's 32k.
        "max_position_embeddings": 1024,
    }))
    .unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let mut reference = gemma3::Model::new(false, &cfg, vb).unwrap();

    // A sequence past the window (its last query sees 512 of its 600 positions in the
    // sliding layers) and a short one, in one forward call.
    let code = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n";
    let long: Vec<u32> = m
        .tokenizer
        .encode(&code.repeat(20), true)
        .unwrap()
        .into_iter()
        .take(600)
        .collect();
    assert_eq!(long.len(), 600);
    let short = m
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let seqs = [long, short];

    let mut kv = KvCache::new(m.model.config(), 16, 64, DType::F32, &dev).unwrap();
    let mut tables: Vec<BlockTable> = seqs.iter().map(|_| BlockTable::default()).collect();
    for (t, s) in tables.iter_mut().zip(&seqs) {
        kv.reserve(t, s.len()).unwrap();
    }
    let inputs: Vec<SeqInput> = seqs
        .iter()
        .zip(&tables)
        .map(|(s, t)| SeqInput {
            tokens: s,
            start_pos: 0,
            table: t,
            logits: true,
        })
        .collect();
    let got = m.model.forward(&inputs, &kv).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let ours: Vec<f32> = got.get(i).unwrap().to_vec1().unwrap();
        reference.clear_kv_cache();
        let x = Tensor::new(s.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want: Vec<f32> = reference
            .forward(&x, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (p, q) = (softmax(&ours), softmax(&want));
        let tv: f32 = p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f32>() / 2.0;
        let (a, b) = (argmax(&ours), argmax(&want));
        eprintln!(
            "sequence {i} ({} tokens): total variation {tv:.4}, greedy {a} / {b} (p {:.3} / {:.3})",
            s.len(),
            p[a],
            q[b]
        );
        assert!(tv < 0.1, "sequence {i}: total variation {tv}");
        assert_eq!(a, b, "sequence {i}: greedy token");
    }
}
