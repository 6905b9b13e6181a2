//! forgeline's inference engine. candle lives here and only here.
//!
//! # Layout
//! - `error`: the crate's `Error` and `Result`, typed by whose fault: `Validation` (one variant
//!   per request field), `ConfigError`, load and time, `Internal` (ours, with sources).
//! - `tokenizer`: tokenizer from tokenizer.json or GGUF metadata; incremental detokenization.
//! - `bench` (feature `bench`): the engine benchmark (prefill, decode, batched decode; candle-transformers'
//!   reference with the `reference-bench` feature).
//! - `chat`: chat templates rendered with minijinja, under fuel, recursion and time limits;
//!   `chat::limits` caps the output and the size arguments of the built-in filters.
//! - `constraint`: constrained decoding (JSON schema, regex, Lark) with llguidance.
//! - `device`: CPU, or CUDA / Metal behind cargo features.
//! - `loader`: a located model to a loaded one (weights, tokenizer, template) or its info.
//! - `model`: forgeline's llama/qwen2 model code, weight loaders, attention kernels.
//! - `kv_cache`: the paged KV cache owned by the engine.
//! - `memory`: large buffers (weights, KV cache) kept out of forked children.
//! - `registry`: where models come from (path, models/ manifests, Hugging Face cache).
//! - `sampling`: logits to tokens (greedy, temperature, top-k/p, min-p, repetition penalty).
//! - `scheduler`: continuous batching of all requests over shared models (`LlmClient`); per
//!   model a `ModelScheduler` whose policy is a pure `schedule(&state) -> StepPlan`, apart
//!   from the forward pass (`ModelRunner`).
//! - `simd`: vector helpers for the CPU kernels and the sampler (AVX2, else plain loops).
//! - `stop`: stop reasons and stop strings.
//! - `synthetic`: random-weight GGUF models of real shapes (benchmarks, tests).

#[cfg(feature = "bench")]
pub mod bench;
pub mod chat;
pub mod constraint;
pub mod device;
pub mod error;
pub mod kv_cache;
pub mod loader;
mod memory;
pub mod model;
pub mod registry;
pub mod sampling;
pub mod scheduler;
mod simd;
pub mod stop;
pub mod synthetic;
pub mod tokenizer;

pub use error::{Error, Result};
