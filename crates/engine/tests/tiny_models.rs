//! forgeline's model code against candle-transformers' reference models, on tiny random-weight
//! models these tests write (GGUF in every tensor type candle handles, Hugging Face safetensors
//! directories in f32 / f16 / bf16, one file or sharded; llama, qwen2 and qwen3 each), and the
//! errors of broken model files.
//!
//! Every sequence of a mixed batch (a prefill together with another sequence's first chunk;
//! then a decode step, that sequence's second chunk and a third whole prompt; then three decode
//! steps), under both attention implementations and with an f32 and an f16 KV cache, must give
//! the logits the reference model gives when it runs that sequence alone from an empty cache.
//!
//! Tolerances:
//! - Unquantized weights (GGUF F32 / F16 / BF16, safetensors in any dtype): 1e-4 absolute on
//!   every logit (logits here are of order 1-10). forgeline computes in f32 from the stored
//!   weights widened to f32; the reference runs in f32 on the same weights (for f16 / bf16
//!   safetensors: the same rounded weights, loaded as f32), so only summation order differs.
//! - Quantized GGUF types: the matmuls quantize their input activations to 8 bits. Most rows
//!   come out bit-identical to the reference, but a last-ulp difference in an attention sum
//!   (forgeline sums in another order) occasionally flips the rounding of one activation, and
//!   the change spreads through the later quantized matmuls: seen here, up to 0.08 on a logit
//!   and 0.015 in total variation, on the longest sequence and its decode step. A real fault
//!   is far larger: q/k rows left in GGUF's interleaved order give 3-6 on logits and 0.4-0.6
//!   in total variation on every row. Checked: next-token distributions within 0.05 in total
//!   variation, and the same greedy token whenever the reference's top two logits are more
//!   than 0.2 apart (over twice the largest logit difference seen).
//! - An f16 KV cache (the default), for any weights: K and V rounded to f16 move logits by
//!   about 3e-3 here, so it gets the quantized types' check.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{
    gemma3, llama, quantized_llama, quantized_qwen2, quantized_qwen3, qwen2, qwen3,
};
use common::{Arch, Rng, Spec, TinyModel};
use forgeline_engine::kv_cache::{BlockTable, KvCache};
use forgeline_engine::loader::{load, LoadedModel};
use forgeline_engine::model::{AttentionImpl, SeqInput};
use forgeline_engine::registry::{Format, ModelLocation, Registry};

const EXACT_TOL: f32 = 1e-4;
const QUANT_MAX_TV: f32 = 0.05;
const QUANT_ARGMAX_MARGIN: f32 = 0.2;

// ---------------------------------------------------------------------------------------------
// Reference models.

enum Reference {
    QLlama(quantized_llama::ModelWeights),
    QQwen2(quantized_qwen2::ModelWeights),
    QQwen3(quantized_qwen3::ModelWeights),
    Llama(llama::Llama, llama::Config),
    Qwen2(qwen2::ModelForCausalLM),
    Qwen3(qwen3::ModelForCausalLM),
    Gemma3(gemma3::Model),
}

impl Reference {
    fn gguf(path: &Path, tiny: &TinyModel) -> Self {
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        match tiny.spec.arch {
            // candle's quantized_gemma3 computes SiLU where Gemma computes GELU: the
            // reference is candle's gemma3 over the file's weights, dequantized, under their
            // Hugging Face names, norms without the 1 the converter added.
            Arch::Gemma3 => {
                let tensors = tiny
                    .tensors
                    .iter()
                    .map(|(hf, _)| {
                        let name = common::gguf_name_of(Arch::Gemma3, hf);
                        let t = ct
                            .tensor(&mut f, &name, &Device::Cpu)
                            .unwrap()
                            .dequantize(&Device::Cpu)
                            .unwrap();
                        let t = if hf.ends_with("norm.weight") {
                            (t - 1.0).unwrap()
                        } else {
                            t
                        };
                        (hf.clone(), t)
                    })
                    .collect();
                let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
                let cfg: gemma3::Config = serde_json::from_value(tiny.hf_config()).unwrap();
                Reference::gemma3(cfg, vb)
            }
            Arch::Llama => Reference::QLlama(
                quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap(),
            ),
            Arch::Qwen2 => Reference::QQwen2(
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap(),
            ),
            Arch::Qwen3 => Reference::QQwen3(
                quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap(),
            ),
        }
    }

    /// The reference in f32 over the stored (possibly f16 / bf16 rounded) weights.
    fn safetensors(dir: &Path, arch: Arch) -> Self {
        let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        // SAFETY: the files are written by this test and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .unwrap();
        match arch {
            Arch::Llama => {
                let cfg = serde_json::from_str::<llama::LlamaConfig>(&json)
                    .unwrap()
                    .into_config(false);
                Reference::Llama(llama::Llama::load(vb, &cfg).unwrap(), cfg)
            }
            Arch::Qwen2 => {
                let cfg: qwen2::Config = serde_json::from_str(&json).unwrap();
                Reference::Qwen2(qwen2::ModelForCausalLM::new(&cfg, vb).unwrap())
            }
            Arch::Qwen3 => {
                let cfg: qwen3::Config = serde_json::from_str(&json).unwrap();
                Reference::Qwen3(qwen3::ModelForCausalLM::new(&cfg, vb).unwrap())
            }
            Arch::Gemma3 => Reference::gemma3(serde_json::from_str(&json).unwrap(), vb),
        }
    }

    /// candle's gemma3 lets a sliding layer's query see `sliding_window` positions before its
    /// own, one more than Gemma (transformers, llama.cpp) and forgeline: it is given one
    /// less.
    fn gemma3(mut cfg: gemma3::Config, vb: VarBuilder) -> Self {
        cfg.sliding_window -= 1;
        Reference::Gemma3(gemma3::Model::new(false, &cfg, vb).unwrap())
    }

    /// Logits of the last token of `tokens`, run alone from an empty cache.
    fn logits(&mut self, tokens: &[u32]) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = match self {
            Reference::QLlama(m) => {
                m.clear_kv_cache();
                m.forward(&x, 0)
            }
            Reference::QQwen2(m) => {
                m.clear_kv_cache();
                m.forward(&x, 0)
            }
            Reference::QQwen3(m) => {
                m.clear_kv_cache();
                m.forward(&x, 0)
            }
            Reference::Llama(m, cfg) => {
                let mut cache = llama::Cache::new(true, DType::F32, cfg, &Device::Cpu).unwrap();
                m.forward(&x, 0, &mut cache)
            }
            Reference::Qwen2(m) => {
                m.clear_kv_cache();
                m.forward(&x, 0)
            }
            Reference::Qwen3(m) => {
                m.clear_kv_cache();
                m.forward(&x, 0)
            }
            Reference::Gemma3(m) => {
                m.clear_kv_cache();
                m.forward(&x, 0)
            }
        };
        out.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    /// Every logit within EXACT_TOL.
    Exact,
    /// Total variation and greedy token, for quantized weights.
    Quantized,
}

#[derive(Default, Debug)]
struct Diffs {
    max_abs: f32,
    max_tv: f32,
    max_logit: f32,
    rows: usize,
}

fn softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

fn top2(xs: &[f32]) -> (usize, f32) {
    let best = forgeline_engine::sampling::argmax(xs) as usize;
    let second = xs
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    (best, xs[best] - second)
}

impl Diffs {
    fn compare(&mut self, got: &[f32], want: &[f32], check: Check, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: vocabulary size");
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{what}: non-finite logits"
        );
        let abs = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let (p, q) = (softmax(got), softmax(want));
        let tv = 0.5 * p.iter().zip(&q).map(|(x, y)| (x - y).abs()).sum::<f32>();
        self.max_abs = self.max_abs.max(abs);
        self.max_tv = self.max_tv.max(tv);
        self.max_logit = want.iter().fold(self.max_logit, |m, x| m.max(x.abs()));
        self.rows += 1;
        match check {
            Check::Exact => {
                let worst = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .enumerate()
                    .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
                assert!(
                    abs <= EXACT_TOL,
                    "{what}: max |logit difference| {abs} > {EXACT_TOL} (token {}: {} vs reference {})",
                    worst.0,
                    got[worst.0],
                    want[worst.0]
                );
            }
            Check::Quantized => {
                assert!(
                    tv < QUANT_MAX_TV,
                    "{what}: total variation {tv} >= {QUANT_MAX_TV}"
                );
                let (want_best, gap) = top2(want);
                if gap > QUANT_ARGMAX_MARGIN {
                    assert_eq!(
                        forgeline_engine::sampling::argmax(got) as usize,
                        want_best,
                        "{what}: greedy token differs (reference margin {gap})"
                    );
                }
            }
        }
    }
}

/// Grows the tables one block at a time in turn, so that each sequence's blocks are scattered
/// through the pool rather than contiguous.
fn reserve_interleaved(kv: &mut KvCache, tables: &mut [BlockTable], needs: &[usize]) {
    let bs = kv.block_size();
    loop {
        let mut grew = false;
        for (t, &need) in tables.iter_mut().zip(needs) {
            let have = t.blocks().len() * bs;
            if have < need {
                kv.reserve(t, have + bs).unwrap();
                grew = true;
            }
        }
        if !grew {
            return;
        }
    }
}

/// The mixed batch of the module doc, under both attention implementations, every returned
/// row against the reference run on that sequence alone.
fn check_mixed_batch(m: &mut LoadedModel, r: &mut Reference, check: Check, label: &str) {
    let vocab = m.model.config().vocab_size;
    let mut rng = Rng::new(7);
    let a = m
        .tokenizer
        .encode("def add(a, b):\n    return a + b", false)
        .unwrap();
    assert!(a.len() >= 8, "{a:?}");
    let b = rng.tokens(45, vocab);
    let c = rng.tokens(21, vocab);
    let mut reference = std::collections::HashMap::<Vec<u32>, Vec<f32>>::new();
    let mut want = |toks: &[u32]| -> Vec<f32> {
        reference
            .entry(toks.to_vec())
            .or_insert_with(|| r.logits(toks))
            .clone()
    };
    let mut diffs = Diffs::default();
    // The f16 cache (the default) rounds every K and V to 11 significant bits, so its rows
    // are held to the quantized tolerance.
    for (imp, kv_dtype) in [
        (AttentionImpl::FusedCpu, DType::F32),
        (AttentionImpl::Generic, DType::F32),
        (AttentionImpl::FusedCpu, DType::F16),
        (AttentionImpl::Generic, DType::F16),
    ] {
        let check = if kv_dtype == DType::F16 {
            Check::Quantized
        } else {
            check
        };
        let label = &format!("{label} {kv_dtype:?} cache");
        m.model.set_attention(imp).unwrap();
        let mut kv = KvCache::new(m.model.config(), 16, 16, kv_dtype, &Device::Cpu).unwrap();
        let mut t = vec![BlockTable::default(); 3];
        reserve_interleaved(&mut kv, &mut t, &[a.len() + 2, b.len() + 1, c.len() + 1]);
        let half = 19; // b's first chunk ends inside its second block
        let run = |seqs: &[SeqInput]| -> Vec<Vec<f32>> {
            m.model.forward(seqs, &kv).unwrap().to_vec2().unwrap()
        };
        let seq = |tokens, start_pos, table, logits| SeqInput {
            tokens,
            start_pos,
            table,
            logits,
        };

        // Step 1: all of a, the first chunk of b (no logits wanted for b yet).
        let l1 = run(&[seq(&a, 0, &t[0], true), seq(&b[..half], 0, &t[1], false)]);
        assert_eq!(l1.len(), 1);
        diffs.compare(
            &l1[0],
            &want(&a),
            check,
            &format!("{label} {imp:?} a prefill"),
        );
        let mut a1 = a.clone();
        a1.push(forgeline_engine::sampling::argmax(&l1[0]));

        // Step 2: a decode step for a, the rest of b, all of c.
        let l2 = run(&[
            seq(&a1[a.len()..], a.len(), &t[0], true),
            seq(&b[half..], half, &t[1], true),
            seq(&c, 0, &t[2], true),
        ]);
        assert_eq!(l2.len(), 3);
        for (got, toks, what) in [
            (&l2[0], &a1, "a decode"),
            (&l2[1], &b, "b second chunk"),
            (&l2[2], &c, "c prefill"),
        ] {
            diffs.compare(got, &want(toks), check, &format!("{label} {imp:?} {what}"));
        }

        // Step 3: one decode step for each of the three.
        let (mut a2, mut b1, mut c1) = (a1.clone(), b.clone(), c.clone());
        a2.push(3); // a fixed token rather than the greedy one
        b1.push(forgeline_engine::sampling::argmax(&l2[1]));
        c1.push(forgeline_engine::sampling::argmax(&l2[2]));
        let l3 = run(&[
            seq(&c1[c.len()..], c.len(), &t[2], true),
            seq(&a2[a1.len()..], a1.len(), &t[0], true),
            seq(&b1[b.len()..], b.len(), &t[1], true),
        ]);
        for (got, toks, what) in [
            (&l3[0], &c1, "c decode"),
            (&l3[1], &a2, "a second decode"),
            (&l3[2], &b1, "b decode"),
        ] {
            diffs.compare(got, &want(toks), check, &format!("{label} {imp:?} {what}"));
        }
    }
    eprintln!(
        "{label}: {} rows, max |logit diff| {:.3e}, max total variation {:.3e} (max |logit| {:.2})",
        diffs.rows, diffs.max_abs, diffs.max_tv, diffs.max_logit
    );
}

fn loc(path: &Path, format: Format) -> ModelLocation {
    ModelLocation {
        name: "tiny".into(),
        format,
        path: path.to_path_buf(),
        chat_template: None,
        recipe: Default::default(),
    }
}

fn check_loaded(m: &LoadedModel, tiny: &TinyModel) {
    let c = m.model.config();
    let s = &tiny.spec;
    assert_eq!(
        (
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.num_layers
        ),
        (s.hidden, s.heads, s.kv_heads, s.head_dim(), s.layers)
    );
    assert_eq!(c.vocab_size, tiny.vocab_size);
    assert_eq!(c.context_length, s.context);
    assert_eq!(m.tokenizer.vocab_size(), tiny.vocab_size);
    assert_eq!(m.info.architecture, s.arch.gguf_name());
    if s.arch == Arch::Gemma3 {
        // Both kinds of layer, as the pattern says.
        let g = c.gemma.as_ref().expect("gemma3's parts");
        let want: Vec<bool> = (0..s.layers)
            .map(|l| (l + 1) % common::GEMMA3_PATTERN != 0)
            .collect();
        assert_eq!(g.sliding, want);
        assert_eq!(g.sliding_window, s.window);
    }
}

/// Writes `tiny` as a GGUF of `dtype`, loads it, and checks it against the reference.
/// The reference for a quantized file is candle's model over its weights dequantized to f32
/// (`CANDLE_DEQUANTIZE_ALL`): the function the file defines, whatever kernels compute it.
/// forgeline's kernels round the activations to 8 bits (per 32 values) and K-quant block
/// scales to f16, which the tolerance allows. candle's own quantized kernels are no closer to
/// each other than that (its AVX-512 VNNI GEMV and its AVX2 kernels differ by a total
/// variation of 0.054 on Qwen2 Q8_0), so they are not the reference. (Set once, before candle
/// first reads it, under std's env lock; candle reads it once per thread, and every test runs
/// on a thread of its own.)
fn pin_candle_reference() {
    static PIN: std::sync::Once = std::sync::Once::new();
    PIN.call_once(|| std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1"));
}

fn gguf_case(tiny: &TinyModel, dtype: GgmlDType, check: Check) {
    pin_candle_reference();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny.write_gguf(&path, dtype);
    let mut m = load(&loc(&path, Format::Gguf), &Device::Cpu).unwrap();
    check_loaded(&m, tiny);
    assert_eq!(m.info.quantization, format!("{dtype:?}"));
    let mut r = Reference::gguf(&path, tiny);
    let label = format!("gguf {:?} {dtype:?}", tiny.spec.arch);
    check_mixed_batch(&mut m, &mut r, check, &label);
}

/// Writes `tiny` as a safetensors directory of `dtype` in `shards` files, and checks it.
fn safetensors_case(tiny: &TinyModel, dtype: DType, shards: usize) {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny.write_safetensors(dir.path(), dtype, shards);
    assert_eq!(files.len(), shards.max(1));
    let mut m = load(&loc(dir.path(), Format::Safetensors), &Device::Cpu).unwrap();
    check_loaded(&m, tiny);
    assert_eq!(
        m.info.quantization,
        format!("{dtype:?}").to_lowercase(),
        "dtype reported"
    );
    let mut r = Reference::safetensors(dir.path(), tiny.spec.arch);
    let label = format!("safetensors {:?} {dtype:?} x{shards}", tiny.spec.arch);
    check_mixed_batch(&mut m, &mut r, Check::Exact, &label);
}

// ---------------------------------------------------------------------------------------------
// GGUF.

#[test]
fn gguf_llama_unquantized_types_match_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Llama));
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        gguf_case(&tiny, dtype, Check::Exact);
    }
}

#[test]
fn gguf_qwen2_unquantized_types_match_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Qwen2));
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        gguf_case(&tiny, dtype, Check::Exact);
    }
}

/// qwen3 with a head size twice hidden / heads and a tied LM head.
#[test]
fn gguf_qwen3_unquantized_types_match_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Qwen3));
    assert_ne!(tiny.spec.head_dim(), tiny.spec.hidden / tiny.spec.heads);
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        gguf_case(&tiny, dtype, Check::Exact);
    }
}

/// Every quantized type llama.cpp writes for weights and candle reads.
const QUANTIZED: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

#[test]
fn gguf_llama_quantized_types_match_reference() {
    let tiny = TinyModel::new(Spec::for_k_quants(Arch::Llama));
    gguf_case(&tiny, GgmlDType::F32, Check::Exact);
    for dtype in QUANTIZED {
        gguf_case(&tiny, dtype, Check::Quantized);
    }
}

#[test]
fn gguf_qwen2_quantized_types_match_reference() {
    let tiny = TinyModel::new(Spec::for_k_quants(Arch::Qwen2));
    gguf_case(&tiny, GgmlDType::F32, Check::Exact);
    for dtype in QUANTIZED {
        gguf_case(&tiny, dtype, Check::Quantized);
    }
}

/// qwen3 with an LM head of its own.
#[test]
fn gguf_qwen3_quantized_types_match_reference() {
    let tiny = TinyModel::new(Spec::for_k_quants(Arch::Qwen3));
    gguf_case(&tiny, GgmlDType::F32, Check::Exact);
    for dtype in QUANTIZED {
        gguf_case(&tiny, dtype, Check::Quantized);
    }
}

/// gemma3: head size of its own, tied LM head, sliding and global layers (each with its
/// rotary base), the norms around attention and the feed-forward block, GELU, scaled
/// embeddings; unquantized and in every quantized type.
#[test]
fn gguf_gemma3_types_match_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Gemma3));
    assert_ne!(tiny.spec.head_dim(), tiny.spec.hidden / tiny.spec.heads);
    for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
        gguf_case(&tiny, dtype, Check::Exact);
    }
    let tiny = TinyModel::new(Spec::for_k_quants(Arch::Gemma3));
    gguf_case(&tiny, GgmlDType::F32, Check::Exact);
    for dtype in QUANTIZED {
        gguf_case(&tiny, dtype, Check::Quantized);
    }
}

/// gemma3 with an 8-position window, which every test sequence but the shortest outgrows:
/// sliding layers see their last eight positions, across cached prefixes and chunks.
#[test]
fn gguf_gemma3_sliding_window_matches_reference() {
    let mut spec = Spec::small(Arch::Gemma3);
    spec.window = 8;
    let tiny = TinyModel::new(spec);
    gguf_case(&tiny, GgmlDType::F32, Check::Exact);
}

// ---------------------------------------------------------------------------------------------
// Safetensors.

#[test]
fn safetensors_llama_matches_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Llama));
    safetensors_case(&tiny, DType::F32, 1);
    safetensors_case(&tiny, DType::F16, 1);
    safetensors_case(&tiny, DType::BF16, 2);
}

#[test]
fn safetensors_qwen2_matches_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Qwen2));
    safetensors_case(&tiny, DType::F32, 2);
    safetensors_case(&tiny, DType::F16, 1);
    safetensors_case(&tiny, DType::BF16, 1);
}

/// qwen3: the small shape (head size of its own, tied LM head) and the K-quant one (an LM
/// head of its own).
#[test]
fn safetensors_qwen3_matches_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Qwen3));
    safetensors_case(&tiny, DType::F32, 1);
    safetensors_case(&tiny, DType::F16, 2);
    safetensors_case(&tiny, DType::BF16, 1);
    let untied = TinyModel::new(Spec::for_k_quants(Arch::Qwen3));
    safetensors_case(&untied, DType::F32, 1);
}

/// gemma3 as Hugging Face stores it: norms without their 1, `layer_types`-less config.
#[test]
fn safetensors_gemma3_matches_reference() {
    let tiny = TinyModel::new(Spec::small(Arch::Gemma3));
    safetensors_case(&tiny, DType::F32, 1);
    safetensors_case(&tiny, DType::BF16, 2);
}

/// The llama GGUF (q/k rows permuted by the converter, unpermuted by the loader) and the
/// safetensors directory of the same weights are the same model.
#[test]
fn gguf_and_safetensors_of_the_same_llama_agree() {
    let tiny = TinyModel::new(Spec::small(Arch::Llama));
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    tiny.write_gguf(&gguf, GgmlDType::F32);
    let st = dir.path().join("st");
    tiny.write_safetensors(&st, DType::F32, 1);
    let g = load(&loc(&gguf, Format::Gguf), &Device::Cpu).unwrap();
    let s = load(&loc(&st, Format::Safetensors), &Device::Cpu).unwrap();
    let toks = Rng::new(3).tokens(30, tiny.vocab_size);
    let logits = |m: &LoadedModel| -> Vec<f32> {
        let mut kv = KvCache::new(m.model.config(), 16, 4, DType::F32, &Device::Cpu).unwrap();
        let mut t = BlockTable::default();
        kv.reserve(&mut t, toks.len()).unwrap();
        let seq = SeqInput {
            tokens: &toks,
            start_pos: 0,
            table: &t,
            logits: true,
        };
        m.model.forward(&[seq], &kv).unwrap().to_vec2().unwrap()[0].clone()
    };
    let mut d = Diffs::default();
    d.compare(
        &logits(&g),
        &logits(&s),
        Check::Exact,
        "gguf vs safetensors",
    );
}

// ---------------------------------------------------------------------------------------------
// Errors: each names the file and what is wrong with it.

fn load_err(path: &Path, format: Format) -> String {
    match load(&loc(path, format), &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention `{p}`: {err}");
    }
}

/// Loading `path` fails with a not-found I/O error on `missing`, whose message names it.
fn assert_not_found(path: &Path, format: Format, missing: &Path) {
    match load(&loc(path, format), &Device::Cpu) {
        Err(e @ forgeline_engine::Error::Io { .. }) => {
            let forgeline_engine::Error::Io { path: p, source } = &e else {
                unreachable!()
            };
            assert_eq!(p, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{e}");
            assert_mentions(&e.to_string(), &[missing.to_str().unwrap()]);
        }
        Err(e) => panic!("expected a not-found error on {}: {e}", missing.display()),
        Ok(_) => panic!("{} loaded", path.display()),
    }
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.gguf");
    let err = Registry::new(dir.path())
        .resolve(absent.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["absent.gguf", "not found"]);
    assert_not_found(&absent, Format::Gguf, &absent);

    // A safetensors directory missing each of its parts in turn.
    let tiny = TinyModel::new(Spec::small(Arch::Qwen2));
    let st = dir.path().join("st");
    tiny.write_safetensors(&st, DType::F32, 1);
    std::fs::remove_file(st.join("tokenizer.json")).unwrap();
    assert_mentions(
        &load_err(&st, Format::Safetensors),
        &[st.to_str().unwrap(), "missing tokenizer.json"],
    );
    common::write_hf_tokenizer(&st, "qwen2");
    std::fs::remove_file(st.join("model.safetensors")).unwrap();
    assert_mentions(
        &load_err(&st, Format::Safetensors),
        &[st.to_str().unwrap(), "no *.safetensors files"],
    );
    std::fs::remove_file(st.join("config.json")).unwrap();
    assert_not_found(&st, Format::Safetensors, &st.join("config.json"));
    let err = Registry::new(dir.path())
        .resolve(st.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &[st.to_str().unwrap(), "config.json"]);
}

#[test]
fn unsupported_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(Spec::small(Arch::Llama));
    let path = dir.path().join("gpt2.gguf");
    let mut md = tiny.gguf_metadata();
    md[0] = (
        "general.architecture".into(),
        Value::String("gpt2".to_string()),
    );
    assert_eq!(md[0].0, "general.architecture");
    common::write_gguf(&path, &md, &tiny.gguf_tensors(GgmlDType::F32));
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &[
            "gpt2.gguf",
            "unsupported architecture `gpt2`",
            "(supported: llama, qwen2, qwen3, gemma3)",
        ],
    );

    let st = dir.path().join("st");
    tiny.write_safetensors(&st, DType::F32, 1);
    let mut cfg = tiny.hf_config();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    cfg["model_type"] = "gpt2".into();
    std::fs::write(st.join("config.json"), cfg.to_string()).unwrap();
    assert_mentions(
        &load_err(&st, Format::Safetensors),
        &[
            st.join("config.json").to_str().unwrap(),
            "unsupported architecture `GPT2LMHeadModel`",
            "Qwen2ForCausalLM, Qwen3ForCausalLM",
        ],
    );
}

/// qwen3's own parts: a missing head norm is named in either format, value heads of another
/// size than key heads are refused, and without `attention.key_length` the head size falls
/// back to hidden / heads, which this model's q projection then does not fit.
#[test]
fn qwen3_head_norms_and_sizes_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(Spec::small(Arch::Qwen3));
    let (h, d) = (tiny.spec.hidden, tiny.spec.head_dim());
    let q_rows = tiny.spec.heads * d;

    let path = dir.path().join("no_norm.gguf");
    let mut tensors = tiny.gguf_tensors(GgmlDType::F32);
    tensors.retain(|(n, _)| n != "blk.1.attn_k_norm.weight");
    common::write_gguf(&path, &tiny.gguf_metadata(), &tensors);
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &["no_norm.gguf", "missing tensor `blk.1.attn_k_norm.weight`"],
    );

    let tensors = tiny.gguf_tensors(GgmlDType::F32);
    let path = dir.path().join("value.gguf");
    let mut md = tiny.gguf_metadata();
    let v = md
        .iter_mut()
        .find(|(k, _)| k == "qwen3.attention.value_length")
        .unwrap();
    v.1 = Value::U32(d as u32 / 2);
    common::write_gguf(&path, &md, &tensors);
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &[
            "value.gguf",
            &format!("value head size {} differs from key head size {d}", d / 2),
        ],
    );

    let path = dir.path().join("no_key_length.gguf");
    let mut md = tiny.gguf_metadata();
    md.retain(|(k, _)| !k.starts_with("qwen3.attention.") || !k.ends_with("_length"));
    assert_eq!(md.len(), tiny.gguf_metadata().len() - 2);
    common::write_gguf(&path, &md, &tensors);
    let fallback = h / tiny.spec.heads;
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &[
            "blk.0.attn_q.weight",
            &format!(
                "shape [{q_rows}, {h}], expected [{}, {h}]",
                tiny.spec.heads * fallback
            ),
        ],
    );

    let st = dir.path().join("st");
    tiny.write_safetensors(&st, DType::F32, 1);
    std::fs::remove_file(st.join("model.safetensors")).unwrap();
    let name = "model.layers.2.self_attn.q_norm.weight";
    let mut kept = tiny.tensors.clone();
    kept.retain(|(n, _)| n != name);
    common::write_safetensors(&st, &kept, 1);
    assert_mentions(
        &load_err(&st, Format::Safetensors),
        &[st.to_str().unwrap(), &format!("missing tensor `{name}`")],
    );
}

#[test]
fn truncated_gguf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(Spec::small(Arch::Qwen2));
    let path = dir.path().join("cut.gguf");
    tiny.write_gguf(&path, GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).unwrap();
    // Cut inside the tensor data: the header reads, the tensors do not fit.
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &["cut.gguf", "truncated", &(bytes.len() - 1000).to_string()],
    );
    // Cut inside the header (in the middle of the vocabulary).
    std::fs::write(&path, &bytes[..2000]).unwrap();
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &["cut.gguf", "not a readable GGUF file"],
    );
}

#[test]
fn wrong_tensor_shapes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(Spec::small(Arch::Llama));
    let (h, i) = (tiny.spec.hidden, tiny.spec.intermediate);

    // GGUF: an FFN matrix stored transposed.
    let path = dir.path().join("shape.gguf");
    let mut tensors = tiny.gguf_tensors(GgmlDType::F32);
    let up = tensors
        .iter_mut()
        .find(|(n, _)| n == "blk.1.ffn_up.weight")
        .unwrap();
    let t = up.1.dequantize(&Device::Cpu).unwrap().t().unwrap();
    up.1 = candle_core::quantized::QTensor::quantize(&t, GgmlDType::F32).unwrap();
    common::write_gguf(&path, &tiny.gguf_metadata(), &tensors);
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &[
            "shape.gguf",
            "blk.1.ffn_up.weight",
            &format!("shape [{h}, {i}], expected [{i}, {h}]"),
        ],
    );

    // GGUF: a tensor left out.
    let path = dir.path().join("missing.gguf");
    let mut tensors = tiny.gguf_tensors(GgmlDType::F32);
    tensors.retain(|(n, _)| n != "blk.2.ffn_gate.weight");
    common::write_gguf(&path, &tiny.gguf_metadata(), &tensors);
    assert_mentions(
        &load_err(&path, Format::Gguf),
        &["missing.gguf", "missing tensor `blk.2.ffn_gate.weight`"],
    );

    // Safetensors, sharded: a k projection with the rows of a q projection, in the second
    // shard; the error names that shard.
    let st = dir.path().join("st");
    let files = tiny.write_safetensors(&st, DType::F32, 2);
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    let name = "model.layers.2.self_attn.k_proj.weight";
    let q_rows = tiny.spec.heads * tiny.spec.head_dim();
    let bad: Vec<(String, Tensor)> = tiny
        .tensors
        .iter()
        .map(|(n, t)| {
            if n == name {
                let t = Tensor::zeros((q_rows, h), DType::F32, &Device::Cpu).unwrap();
                (n.clone(), t)
            } else {
                (n.clone(), t.clone())
            }
        })
        .collect();
    let files = common::write_safetensors(&st, &bad, 2);
    let kv_rows = tiny.spec.kv_heads * tiny.spec.head_dim();
    assert_mentions(
        &load_err(&st, Format::Safetensors),
        &[
            files[1].to_str().unwrap(),
            name,
            &format!("shape [{q_rows}, {h}], expected [{kv_rows}, {h}]"),
        ],
    );
}

/// Fill in the middle on a model whose vocabulary has FIM tokens: the prompt is the prefix
/// and the suffix between the model's own tokens, in StarCoder's and Qwen2.5-Coder's order,
/// and the scheduler generates the middle (the default model, which has none, refuses `suffix`
/// by name: tests/openai_client).
#[test]
fn infill_prompts_use_the_models_fim_tokens() {
    use forgeline_engine::scheduler::{GenerateRequest, LlmClient, Prompt, SchedulerConfig};
    let tiny = TinyModel::new(Spec::small(Arch::Qwen2));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny.write_gguf(&path, GgmlDType::F32);
    let m = load(&loc(&path, Format::Gguf), &Device::Cpu).unwrap();
    let fim = m
        .tokenizer
        .fim_tokens()
        .expect("the tiny vocabulary has FIM tokens");
    let ids = |t: &str| m.tokenizer.encode(t, false).unwrap();
    let mut want = vec![fim.prefix];
    want.extend(ids("def f(x):\n    "));
    want.push(fim.suffix);
    want.extend(ids("\n    return y"));
    want.push(fim.middle);
    let vocab = common::vocab();
    assert_eq!(vocab[fim.prefix as usize], "<|fim_prefix|>");
    assert_eq!(vocab[fim.middle as usize], "<|fim_middle|>");
    let client = LlmClient::start(vec![m], SchedulerConfig::default()).unwrap();
    let mut req = GenerateRequest::new(
        Prompt::Infill {
            prefix: "def f(x):\n    ".into(),
            suffix: "\n    return y".into(),
        },
        6,
    );
    req.ignore_eos = true;
    assert_eq!(client.tokenize(&req).unwrap(), want);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let done = rt
        .block_on(client.generate(req).unwrap().collect())
        .unwrap();
    assert_eq!(done.tokens.len(), 6);
    assert_eq!(done.usage.prompt_tokens, want.len());
}

/// A model without a chat template cannot render a chat: the error says so and how to give
/// one (never a guessed ChatML). A manifest's `chat_template` replaces the model's own:
/// `chatml`, or a Jinja template; a broken one is named at load.
#[test]
fn a_model_without_a_chat_template_says_so_and_a_manifest_can_give_one() {
    use forgeline_engine::chat::ChatMessage;
    let tiny = TinyModel::new(Spec::small(Arch::Llama));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    tiny.write_gguf(&path, GgmlDType::F32);
    let chat = [ChatMessage::user("hi")];

    let m = load(&loc(&path, Format::Gguf), &Device::Cpu).unwrap();
    assert!(m.chat_template.is_missing());
    let err = m.chat_template.render(&chat, true).unwrap_err();
    assert!(
        matches!(err, forgeline_engine::Error::NoChatTemplate(_)),
        "{err:?}"
    );
    assert_mentions(
        &err.to_string(),
        &[
            "base.gguf",
            "no chat template",
            "chat_template = \"chatml\"",
        ],
    );

    let with = |t: &str| ModelLocation {
        chat_template: Some(t.into()),
        recipe: Default::default(),
        ..loc(&path, Format::Gguf)
    };
    let m = load(&with("chatml"), &Device::Cpu).unwrap();
    assert_eq!(
        m.chat_template.render(&chat, true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let m = load(
        &with("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.chat_template.render(&chat, true).unwrap(), "[user] hi\n");
    let err = load(&with("{% for m in messages %}"), &Device::Cpu)
        .err()
        .expect("a broken template fails the load")
        .to_string();
    assert_mentions(&err, &["manifest", "chat_template"]);
}
