//! The engine's errors, typed by whose fault they are, so callers map them without reading
//! messages: [`Validation`] for a request that cannot run as written (one variant per field,
//! carrying the value and the limit), [`ConfigError`] for the engine's own settings,
//! `Overloaded` / `OutOfMemory` / `Cancelled` / `DeadlineExceeded` for load and time, and
//! [`Internal`] for our own failures, with their sources.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that exists but cannot be used: truncated, wrong architecture, missing key,
    /// tensor of the wrong shape or size.
    #[error("{path}: {msg}")]
    BadModel { path: PathBuf, msg: String },
    #[error("model `{name}` not found: {searched}")]
    ModelNotFound { name: String, searched: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A chat for a model that has no chat template (and no override in its manifest).
    #[error("{0}")]
    NoChatTemplate(String),
    /// A chat template that ran past a resource limit while rendering: broken, not merely
    /// unhappy with one conversation. `origin` names the template (may be empty).
    #[error("chat template: {}render: over its limits: {limit}", prefix(origin))]
    TemplateOverLimit {
        origin: String,
        limit: TemplateLimit,
    },
    /// The caller's request cannot run as written.
    #[error(transparent)]
    Validation(#[from] Validation),
    /// The engine's own settings (device, KV cache, models served) cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The waiting queue is full: the request was refused before it was queued.
    #[error("overloaded: {waiting} requests are waiting (limit {limit})")]
    Overloaded { waiting: usize, limit: usize },
    /// The KV cache cannot hold a sequence: which one, by how many blocks, and what to do.
    #[error("out of KV cache memory: {0}")]
    OutOfMemory(#[from] KvShortage),
    /// The request was cancelled before it finished. The scheduler does not send it today (a
    /// dropped stream has no one to tell); callers that cancel on a caller's behalf do.
    #[error("the request was cancelled")]
    Cancelled,
    /// The request's deadline, `after` its submission, passed before it finished, for callers
    /// that need the whole answer (the scheduler itself ends such a request with
    /// `StopReason::Deadline` and what it produced so far).
    #[error("the request's deadline ({after:?} after it was submitted) passed")]
    DeadlineExceeded { after: Duration },
    /// Our failure, not the caller's.
    #[error(transparent)]
    Internal(#[from] Internal),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The resource limit a chat template ran past.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateLimit {
    #[error("took longer than {secs} s and was abandoned")]
    Time { secs: u64 },
    #[error("the output exceeds {bytes} bytes")]
    Output { bytes: usize },
    #[error("ran out of fuel after {steps} steps (a loop that does not end?)")]
    Fuel { steps: u64 },
}

fn prefix(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!("{origin}: ")
    }
}

/// A request the engine refuses, one variant per field at fault. Messages name the field in
/// backticks, as the API documents it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Validation {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens; model `{model}` holds {context} in its context, including the answer")]
    PromptTooLong {
        tokens: usize,
        context: usize,
        model: String,
    },
    #[error("prompt token id {token} is outside the vocabulary ({vocab} tokens)")]
    PromptToken { token: u32, vocab: usize },
    #[error("`max_tokens` must be at least 1")]
    MaxTokensZero,
    #[error("`max_tokens` {requested} plus the prompt's {prompt} tokens exceeds the context of {context}")]
    MaxTokens {
        requested: usize,
        prompt: usize,
        context: usize,
    },
    #[error("`deadline` must be positive")]
    Deadline,
    #[error("`temperature` must be a finite number >= 0")]
    Temperature(f32),
    #[error("`top_p` must be in (0, 1]")]
    TopP(f32),
    #[error("`min_p` must be in [0, 1)")]
    MinP(f32),
    #[error("`repetition_penalty` must be a finite number > 0")]
    RepetitionPenalty(f32),
    #[error("`dry_multiplier` must be a finite number >= 0")]
    DryMultiplier(f32),
    #[error("`dry_base` must be a finite number >= 1")]
    DryBase(f32),
    #[error("`dry_allowed_length` must be at least 1")]
    DryAllowedLength(usize),
    #[error("`dry_penalty_last_n` must be -1 (all), 0 (off) or a count of tokens")]
    DryPenaltyLastN(i64),
    #[error("model `{model}` has no fill-in-the-middle tokens (<|fim_prefix|>, <fim_prefix>, ...): `suffix` needs a code model trained for infilling")]
    NoInfill { model: String },
    #[error("`top_logprobs` must be at most {max}, not {0}", max = crate::scheduler::MAX_TOP_LOGPROBS)]
    TopLogprobs(usize),
    #[error("unknown model `{name}` (loaded: {})", loaded.join(", "))]
    UnknownModel { name: String, loaded: Vec<String> },
    /// A constraint that does not compile; `kind` is `JSON schema`, `JSON`, `regex` or
    /// `Lark grammar`.
    #[error("{kind}: {reason}")]
    Constraint { kind: &'static str, reason: String },
    /// The constraint's grammar failed while decoding (it allows nothing, or is in error).
    #[error("constrained decoding: {0}")]
    ConstrainedDecoding(String),
}

impl Validation {
    /// The request field at fault, as the HTTP API names it (`prompt` stands for whichever
    /// field carried the prompt).
    pub fn field(&self) -> &'static str {
        use Validation as V;
        match self {
            V::EmptyPrompt | V::PromptTooLong { .. } | V::PromptToken { .. } => "prompt",
            V::MaxTokensZero | V::MaxTokens { .. } => "max_tokens",
            V::Deadline => "deadline",
            V::TopLogprobs(_) => "top_logprobs",
            V::NoInfill { .. } => "suffix",
            V::Temperature(_) => "temperature",
            V::TopP(_) => "top_p",
            V::MinP(_) => "min_p",
            V::RepetitionPenalty(_) => "repetition_penalty",
            V::DryMultiplier(_) => "dry_multiplier",
            V::DryBase(_) => "dry_base",
            V::DryAllowedLength(_) => "dry_allowed_length",
            V::DryPenaltyLastN(_) => "dry_penalty_last_n",
            V::UnknownModel { .. } => "model",
            V::Constraint { kind: "regex", .. } => "regex",
            V::Constraint {
                kind: "Lark grammar",
                ..
            } => "grammar",
            V::Constraint { .. } | V::ConstrainedDecoding(_) => "response_format",
        }
    }
}

/// Why the KV cache cannot hold a sequence, in the cache's own units: blocks of `block_size`
/// token positions. The cache's size per model is `SchedulerConfig::kv_budget_bytes` (by
/// default derived from available memory, and at least one full context).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvShortage {
    /// A waiting request's tokens (its prompt, and what it generated before a preemption)
    /// need more blocks than the whole cache has, with the first token to generate: it can
    /// never be admitted.
    #[error(
        "the prompt's {tokens} tokens need {needed_blocks} blocks of {block_size} tokens, and \
         the whole cache has {cache_blocks} ({} tokens): use a shorter prompt, or a larger KV \
         cache (`SchedulerConfig::kv_budget_bytes`)",
        cache_blocks * block_size
    )]
    Prompt {
        tokens: usize,
        needed_blocks: usize,
        cache_blocks: usize,
        block_size: usize,
    },
    /// A running request grew to `tokens` and would need more blocks than the whole cache
    /// has, with no other request left to preempt.
    #[error(
        "the sequence grew to {tokens} tokens, which need {needed_blocks} blocks of \
         {block_size} tokens, and the whole cache has {cache_blocks} ({} tokens): use a \
         smaller `max_tokens` or a shorter prompt, or a larger KV cache \
         (`SchedulerConfig::kv_budget_bytes`)",
        cache_blocks * block_size
    )]
    Sequence {
        tokens: usize,
        needed_blocks: usize,
        cache_blocks: usize,
        block_size: usize,
    },
    /// `KvCache::reserve`: holding `tokens` positions needs `needed_blocks` more blocks than
    /// the table has, and fewer are free now (nothing was allocated).
    #[error(
        "{tokens} tokens need {needed_blocks} more blocks of {block_size} tokens, and \
         {free_blocks} are free: release other sequences' blocks first, or use a larger cache"
    )]
    Reserve {
        tokens: usize,
        needed_blocks: usize,
        free_blocks: usize,
        block_size: usize,
    },
}

/// Settings of the engine itself that cannot work: the operator's mistake, found at start.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("device `{device}`: `{index}` is not a device index")]
    DeviceIndex { device: String, index: String },
    #[error("unknown device `{0}` (expected cpu, cuda[:N] or metal[:N])")]
    UnknownDevice(String),
    #[error("this forgeline was built without the `{0}` feature")]
    NotBuiltWith(&'static str),
    #[error("the fused attention kernels run on CPU only")]
    FusedAttentionNeedsCpu,
    #[error("KV cache needs a positive block size and block count")]
    EmptyKvCache,
    #[error("KV cache type {0:?} is not supported (f16 or f32)")]
    KvCacheType(DType),
    #[error("the scheduler needs at least one model")]
    NoModels,
    #[error("model `{0}` is loaded twice")]
    DuplicateModel(String),
    #[error("the benchmark needs {needed} positions, the model's context holds {context}")]
    BenchContext { needed: usize, context: usize },
    /// A synthetic model that cannot be made (see `synthetic`).
    #[error("{0}")]
    Synthetic(String),
    /// `models import` that cannot be done: a name that is taken or not a plain name.
    #[error("{0}")]
    Import(String),
}

/// Our own failures: a bug or a broken engine, never the caller's request.
#[derive(Debug, thiserror::Error)]
pub enum Internal {
    /// A forward pass failed; every request in that step gets this, sharing the cause.
    #[error("forward pass failed: {0}")]
    ForwardPass(#[source] Arc<Error>),
    /// A batch handed to `Model::forward` that does not fit the model or its block tables.
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("engine lock poisoned")]
    LockPoisoned,
    /// `LlmClient::shutdown` ran: no more requests are taken.
    #[error("the engine has stopped")]
    EngineStopped,
    /// The engine thread is gone (it panicked or returned).
    #[error("the engine thread has stopped")]
    EngineThreadStopped,
    /// A request's events ended without its `Done`.
    #[error("the engine stopped before the request finished")]
    StreamEnded,
    #[error("cannot start the engine thread: {0}")]
    ThreadSpawn(#[source] std::io::Error),
    #[error("bench task failed: {0}")]
    BenchTask(#[source] tokio::task::JoinError),
}

impl Internal {
    /// The engine can take no more requests until it is restarted (503, not 500).
    pub fn engine_stopped(&self) -> bool {
        matches!(
            self,
            Internal::EngineStopped | Internal::EngineThreadStopped | Internal::StreamEnded
        )
    }
}

/// A batch `Model::forward` cannot run: the scheduler (or another caller) built it wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("sequence {seq} has no tokens")]
    EmptySequence { seq: usize },
    #[error("sequence {seq} reaches position {end}, beyond the context length {context}")]
    BeyondContext {
        seq: usize,
        end: usize,
        context: usize,
    },
    #[error("sequence {seq}: its block table covers {covered} positions, {needed} are needed")]
    BlockTable {
        seq: usize,
        covered: usize,
        needed: usize,
    },
    #[error("token id {token} is outside the vocabulary ({vocab} tokens)")]
    Token { token: u32, vocab: usize },
}

impl Error {
    pub fn bad_model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadModel {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The request field at fault, for a validation error.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Validation(v) => Some(v.field()),
            _ => None,
        }
    }
}

impl From<BatchError> for Error {
    fn from(e: BatchError) -> Self {
        Error::Internal(Internal::Batch(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_its_field_and_the_message_agrees() {
        let cases = [
            Validation::Temperature(-1.0),
            Validation::TopP(0.0),
            Validation::MinP(1.0),
            Validation::RepetitionPenalty(0.0),
            Validation::DryMultiplier(-1.0),
            Validation::DryBase(0.5),
            Validation::DryAllowedLength(0),
            Validation::DryPenaltyLastN(-2),
            Validation::MaxTokensZero,
            Validation::MaxTokens {
                requested: 9,
                prompt: 8,
                context: 16,
            },
            Validation::Deadline,
        ];
        for v in cases {
            // The message names the same field in backticks, first.
            let msg = v.to_string();
            assert_eq!(msg.split('`').nth(1), Some(v.field()), "{msg}");
        }
        let long = Validation::PromptTooLong {
            tokens: 20,
            context: 16,
            model: "m".into(),
        };
        assert_eq!(long.field(), "prompt");
        assert_eq!(Error::from(long).field(), Some("prompt"));
        let model = Validation::UnknownModel {
            name: "x".into(),
            loaded: vec!["a".into(), "b".into()],
        };
        assert_eq!(model.field(), "model");
        assert_eq!(model.to_string(), "unknown model `x` (loaded: a, b)");
        assert_eq!(Error::Cancelled.field(), None);
    }

    #[test]
    fn a_kv_shortage_states_its_figures_and_the_remedy() {
        let prompt = Error::from(KvShortage::Prompt {
            tokens: 300,
            needed_blocks: 19,
            cache_blocks: 16,
            block_size: 16,
        });
        assert_eq!(
            prompt.to_string(),
            "out of KV cache memory: the prompt's 300 tokens need 19 blocks of 16 tokens, and \
             the whole cache has 16 (256 tokens): use a shorter prompt, or a larger KV cache \
             (`SchedulerConfig::kv_budget_bytes`)"
        );
        let grown = Error::from(KvShortage::Sequence {
            tokens: 300,
            needed_blocks: 19,
            cache_blocks: 16,
            block_size: 16,
        });
        assert_eq!(
            grown.to_string(),
            "out of KV cache memory: the sequence grew to 300 tokens, which need 19 blocks of \
             16 tokens, and the whole cache has 16 (256 tokens): use a smaller `max_tokens` or \
             a shorter prompt, or a larger KV cache (`SchedulerConfig::kv_budget_bytes`)"
        );
        let reserve = Error::from(KvShortage::Reserve {
            tokens: 9,
            needed_blocks: 3,
            free_blocks: 2,
            block_size: 4,
        });
        assert_eq!(
            reserve.to_string(),
            "out of KV cache memory: 9 tokens need 3 more blocks of 4 tokens, and 2 are free: \
             release other sequences' blocks first, or use a larger cache"
        );
        assert_eq!(reserve.field(), None);
    }

    #[test]
    fn a_forward_failure_keeps_its_source() {
        let cause = Arc::new(Error::from(BatchError::EmptySequence { seq: 3 }));
        let e = Error::from(Internal::ForwardPass(cause));
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "sequence 3 has no tokens");
        assert_eq!(
            e.to_string(),
            "forward pass failed: sequence 3 has no tokens"
        );
    }
}
