//! One request in the scheduler: its tokens, its KV blocks, its sampler, and how it turns
//! sampled tokens into text and stop decisions. A constrained request masks the logits with
//! its grammar before sampling and feeds the grammar the token after.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use super::request::ValidRequest;
use crate::constraint::ConstraintState;
use crate::kv_cache::BlockTable;
use crate::sampling::{Logprobs, Sampler};
use crate::stop::{StopReason, StopStrings};
use crate::tokenizer::{Detokenizer, Tokenizer};
use crate::{Error, Result};

/// Token counts and timings of a finished request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue_time: Duration,
    pub time_to_first_token: Duration,
    pub decode_time: Duration,
    /// Times the request was preempted and recomputed.
    pub preemptions: usize,
    /// Time spent in the request's constraint (token masks and grammar updates).
    pub constraint_time: Duration,
}

/// One generated token's log-probability (see `Sampler::logprobs`) and the most likely
/// tokens' at its step, each with its bytes (a token may hold part of a character). A token
/// a constraint forced has log-probability 0.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

impl TokenLogprob {
    fn new(lp: Logprobs, tok: &Tokenizer) -> Self {
        Self {
            token: lp.token,
            bytes: tok.token_bytes(lp.token),
            logprob: lp.logprob,
            top: lp
                .top
                .into_iter()
                .map(|(token, logprob)| TopLogprob {
                    token,
                    bytes: tok.token_bytes(token),
                    logprob,
                })
                .collect(),
        }
    }
}

/// What a caller receives, in order: deltas, then one `Done`.
#[derive(Clone, Debug)]
pub enum Event {
    Delta {
        text: String,
        tokens: Vec<u32>,
        /// One per token when the request asked for log-probabilities, else empty.
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        stop_reason: StopReason,
        usage: Usage,
    },
}

pub(crate) type EventSender = UnboundedSender<Result<Event>>;

pub(crate) struct Seq {
    pub id: u64,
    pub req: ValidRequest,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Positions whose KV is in `table`.
    pub computed: usize,
    pub table: BlockTable,
    sampler: Sampler,
    constraint: Option<ConstraintState>,
    /// Set when the request failed mid-way: sent instead of `Done`.
    failure: Option<Error>,
    detok: Detokenizer,
    stops: StopStrings,
    events: EventSender,
    /// Tokens sampled but not yet sent (sent once per step, with their text).
    pending_tokens: Vec<u32>,
    pending_text: String,
    pending_logprobs: Vec<TokenLogprob>,
    pub usage: Usage,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    pub finished: Option<StopReason>,
    /// Lives as long as the request; its close records the outcome.
    span: tracing::Span,
}

impl Seq {
    pub fn new(id: u64, mut req: ValidRequest, events: EventSender) -> Result<Self> {
        let span = tracing::info_span!(
            "request",
            id,
            model = req.model,
            priority = ?req.priority,
            prompt_tokens = req.prompt.len(),
            cached_prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            stop_reason = tracing::field::Empty,
        );
        Ok(Self {
            span,
            id,
            sampler: Sampler::new(req.sampling.clone())?,
            constraint: req.constraint.take(),
            failure: None,
            stops: StopStrings::new(req.stop_strings.clone()),
            tokens: req.prompt.clone(),
            usage: Usage {
                prompt_tokens: req.prompt.len(),
                ..Default::default()
            },
            req,
            computed: 0,
            table: BlockTable::default(),
            detok: Detokenizer::default(),
            events,
            pending_tokens: Vec::new(),
            pending_text: String::new(),
            pending_logprobs: Vec::new(),
            admitted: None,
            first_token: None,
            finished: None,
        })
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.req.prompt.len()
    }

    /// Whoever asked has gone away (dropped the stream).
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed()
    }

    pub fn was_admitted(&self) -> bool {
        self.admitted.is_some()
    }

    pub fn past_deadline(&self, now: Instant) -> bool {
        self.req.deadline.is_some_and(|d| now >= d)
    }

    pub fn mark_admitted(&mut self, cached: usize) {
        if self.admitted.is_none() {
            self.admitted = Some(Instant::now());
            self.usage.queue_time = self.req.submitted.elapsed();
            self.usage.cached_prompt_tokens = cached;
        }
    }

    /// Takes a sampled token's logits row; decides the token and whether the request is done.
    /// Returns the number of tokens added: a constrained request also takes the tokens its
    /// grammar then forces (they are computed together at the next step, without sampling).
    pub fn accept(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        context_length: usize,
    ) -> Result<usize> {
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.mask(logits) {
                self.abort(e, tok)?;
                return Ok(0);
            }
        }
        if self.sampler.uses_dry() {
            self.sampler
                .penalize_repeats(logits, &self.tokens, tok.dry_breakers());
        }
        let t = match self.req.logprobs {
            None => self.sampler.sample(logits, &self.tokens),
            Some(top) => {
                self.sampler.penalize(logits, &self.tokens);
                let row = logits.to_vec();
                let t = self.sampler.draw(logits);
                let lp = self.sampler.logprobs(&row, t, top);
                self.pending_logprobs.push(TokenLogprob::new(lp, tok));
                t
            }
        };
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
            self.usage.time_to_first_token = self.req.submitted.elapsed();
        }
        let mut added = 1;
        let mut stop = self.push(t, tok)?;
        // A grammar hears every token but an EOS that ends the request.
        if let (Some(c), None) = (&mut self.constraint, stop) {
            let forced = match c.consume(t) {
                Ok(()) => c.consume_forced(),
                Err(e) => {
                    self.abort(e, tok)?;
                    return Ok(added);
                }
            };
            let mut all = true;
            for f in forced {
                if self.limit(context_length).is_some() {
                    all = false;
                    break;
                }
                added += 1;
                if let Some(top) = self.req.logprobs {
                    // The grammar allowed nothing else: probability 1.
                    let lp = Logprobs {
                        token: f,
                        logprob: 0.0,
                        top: if top > 0 { vec![(f, 0.0)] } else { Vec::new() },
                    };
                    self.pending_logprobs.push(TokenLogprob::new(lp, tok));
                }
                stop = self.push(f, tok)?;
                if stop.is_some() {
                    break;
                }
            }
            let done = self.constraint.as_ref().is_some_and(|c| c.is_done());
            if stop.is_none() && all && done {
                stop = Some(StopReason::ConstraintDone);
            }
        }
        if let Some(reason) = stop.or_else(|| self.limit(context_length)) {
            self.finish(reason, tok)?;
        }
        Ok(added)
    }

    /// Appends a token; the stop it causes by itself (EOS, stop token, stop string).
    fn push(&mut self, t: u32, tok: &Tokenizer) -> Result<Option<StopReason>> {
        self.tokens.push(t);
        self.pending_tokens.push(t);
        Ok(if !self.req.ignore_eos && tok.is_eos(t) {
            Some(StopReason::Eos)
        } else if self.req.stop_token_ids.contains(&t) {
            Some(StopReason::StopToken)
        } else {
            let delta = self.detok.next(tok, t)?.unwrap_or_default();
            let (emit, hit) = self.stops.push(&delta);
            self.pending_text.push_str(&emit);
            hit.then_some(StopReason::StopString)
        })
    }

    /// The length limit reached, if any.
    fn limit(&self, context_length: usize) -> Option<StopReason> {
        if self.generated() >= self.req.max_tokens {
            Some(StopReason::MaxTokens)
        } else if self.tokens.len() >= context_length {
            Some(StopReason::ContextFull)
        } else {
            None
        }
    }

    /// Ends the request with an error, after the text produced so far.
    fn abort(&mut self, e: Error, tok: &Tokenizer) -> Result<()> {
        self.failure = Some(e);
        self.finish(StopReason::ConstraintDone, tok)
    }

    /// Ends the request: flushes held-back text (unless a stop string cut it).
    pub fn finish(&mut self, reason: StopReason, tok: &Tokenizer) -> Result<()> {
        if reason != StopReason::StopString {
            let tail = self.detok.flush(tok)?.unwrap_or_default();
            let (emit, _) = self.stops.push(&tail);
            self.pending_text.push_str(&emit);
            let rest = self.stops.finish();
            self.pending_text.push_str(&rest);
        }
        self.finished = Some(reason);
        Ok(())
    }

    /// Sends what this step produced; the final `Done` once finished.
    pub fn flush_events(&mut self) {
        if !self.pending_tokens.is_empty() || !self.pending_text.is_empty() {
            let _ = self.events.send(Ok(Event::Delta {
                text: std::mem::take(&mut self.pending_text),
                tokens: std::mem::take(&mut self.pending_tokens),
                logprobs: std::mem::take(&mut self.pending_logprobs),
            }));
        }
        if let Some(e) = self.failure.take() {
            let _ = self.events.send(Err(e));
        } else if let Some(reason) = self.finished {
            if let Some(c) = &self.constraint {
                self.usage.constraint_time = c.cost().0;
            }
            self.usage.completion_tokens = self.generated();
            self.usage.decode_time = self.first_token.map(|t| t.elapsed()).unwrap_or_default();
            self.span
                .record("cached_prompt_tokens", self.usage.cached_prompt_tokens);
            self.span
                .record("completion_tokens", self.usage.completion_tokens);
            self.span
                .record("stop_reason", tracing::field::debug(reason));
            self.span
                .in_scope(|| tracing::debug!(usage = ?self.usage, "request done"));
            let _ = self.events.send(Ok(Event::Done {
                stop_reason: reason,
                usage: self.usage.clone(),
            }));
        }
    }

    pub fn fail(&self, e: Error) {
        let _ = self.events.send(Err(e));
    }
}
