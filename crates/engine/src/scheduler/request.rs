//! Requests as callers write them, and as the scheduler runs them: validated at the boundary
//! into a `ValidRequest`, with errors that name the problem.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::constraint::{Constraint, ConstraintState};
use crate::error::Validation;
use crate::sampling::SamplingParams;
use crate::{Error, Result};

/// What to complete.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw text, tokenized as is (the model's BOS added where its tokenizer asks for one).
    Text(String),
    /// Messages rendered with the model's chat template, ready for the assistant's turn.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
    /// Fill in the middle: the code before and after the gap, written with the model's FIM
    /// tokens (prefix, suffix, middle: StarCoder's and Qwen2.5-Coder's order); the model
    /// writes the middle. A model without FIM tokens refuses it.
    Infill { prefix: String, suffix: String },
    /// Messages rendered for the assistant's turn, and the start of that turn already
    /// written: the model continues `assistant_prefix` (a code fence and a signature, say).
    ChatContinue {
        messages: Vec<ChatMessage>,
        assistant_prefix: String,
    },
}

/// Scheduling class. Requests of a higher class are admitted first; waiting requests gain
/// one class per `Scheduler::AGEING` waited, so that nothing starves.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Work that unblocks the final answer.
    Critical,
    /// Work that unblocks a retry or a waiting stage.
    High,
    #[default]
    Normal,
    /// Background work.
    Low,
}

impl Priority {
    pub fn rank(self) -> u32 {
        self as u32
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Model name; None means the client's default model (the first loaded).
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    pub priority: Priority,
    /// Time allowed from submission to the last token; past it the request ends with
    /// `StopReason::Deadline` and what it produced so far.
    pub deadline: Option<Duration>,
    /// The shape the output must have (JSON schema, regex, grammar), enforced at sampling
    /// time. The request ends with `StopReason::ConstraintDone` once the output is complete
    /// and the grammar admits nothing more (or with EOS where it may stop).
    pub constraint: Option<Constraint>,
    /// Report each generated token's log-probability and those of the `n` most likely
    /// tokens at its step (at most `MAX_TOP_LOGPROBS`); None reports none.
    pub logprobs: Option<usize>,
    /// Functions the model may call (OpenAI's `tools`, as JSON), given to a chat prompt's
    /// template (see `ChatTemplate::render_with_tools`).
    pub tools: Vec<serde_json::Value>,
}

/// The most alternatives a request may ask log-probabilities for at each step (OpenAI's and
/// vLLM's default limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl GenerateRequest {
    pub fn new(prompt: Prompt, max_tokens: usize) -> Self {
        Self {
            model: None,
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            priority: Priority::Normal,
            deadline: None,
            constraint: None,
            logprobs: None,
            tools: Vec::new(),
        }
    }

    pub fn chat(messages: Vec<ChatMessage>, max_tokens: usize) -> Self {
        Self::new(Prompt::Chat(messages), max_tokens)
    }
}

/// A request checked against its model: tokens in range, lengths within the context.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub model: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub priority: Priority,
    pub submitted: Instant,
    pub deadline: Option<Instant>,
    /// The compiled constraint, at the start of its grammar.
    pub constraint: Option<ConstraintState>,
    pub logprobs: Option<usize>,
}

/// What validation needs to know of a model.
pub struct ModelLimits {
    pub name: String,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl ValidRequest {
    pub fn new(
        req: &GenerateRequest,
        model: usize,
        limits: &ModelLimits,
        prompt: Vec<u32>,
    ) -> Result<Self> {
        let bad = |v: Validation| Err(Error::Validation(v));
        req.sampling.validate()?;
        if prompt.is_empty() {
            return bad(Validation::EmptyPrompt);
        }
        let ctx = limits.context_length;
        if prompt.len() >= ctx {
            return bad(Validation::PromptTooLong {
                tokens: prompt.len(),
                context: ctx,
                model: limits.name.clone(),
            });
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return bad(Validation::PromptToken {
                token: t,
                vocab: limits.vocab_size,
            });
        }
        if req.max_tokens == 0 {
            return bad(Validation::MaxTokensZero);
        }
        if prompt.len() + req.max_tokens > ctx {
            return bad(Validation::MaxTokens {
                requested: req.max_tokens,
                prompt: prompt.len(),
                context: ctx,
            });
        }
        if req.deadline == Some(Duration::ZERO) {
            return bad(Validation::Deadline);
        }
        if let Some(n) = req.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad(Validation::TopLogprobs(n));
        }
        let submitted = Instant::now();
        Ok(Self {
            model,
            prompt,
            max_tokens: req.max_tokens,
            sampling: req.sampling.clone(),
            stop_strings: req.stop_strings.clone(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            priority: req.priority,
            submitted,
            deadline: req.deadline.map(|d| submitted + d),
            constraint: None,
            logprobs: req.logprobs,
        })
    }

    /// Adds the compiled form of the request's constraint.
    pub fn with_constraint(mut self, c: Option<ConstraintState>) -> Self {
        self.constraint = c;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ModelLimits {
        ModelLimits {
            name: "m".into(),
            context_length: 16,
            vocab_size: 100,
        }
    }

    fn check(req: GenerateRequest, prompt: Vec<u32>) -> String {
        ValidRequest::new(&req, 0, &limits(), prompt)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn each_bad_value_is_named() {
        let r = |n| GenerateRequest::new(Prompt::Tokens(vec![]), n);
        assert!(check(r(4), vec![]).contains("empty"));
        assert!(check(r(4), vec![1; 16]).contains("16 tokens"));
        assert!(check(r(4), vec![1, 500]).contains("500"));
        assert!(check(r(0), vec![1]).contains("max_tokens"));
        assert!(check(r(20), vec![1]).contains("max_tokens"));
        let mut bad_p = r(4);
        bad_p.sampling.top_p = 2.0;
        assert!(check(bad_p, vec![1]).contains("top_p"));
        assert!(ValidRequest::new(&r(15), 0, &limits(), vec![1]).is_ok());
    }
}
