//! One request in the scheduler: its tokens, its KV blocks, its sampler, and how it turns
//! sampled tokens into text and stop decisions.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use super::request::ValidRequest;
use crate::kv_cache::BlockTable;
use crate::sampling::Sampler;
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
}

/// What a caller receives, in order: deltas, then one `Done`.
#[derive(Clone, Debug)]
pub enum Event {
    Delta {
        text: String,
        tokens: Vec<u32>,
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
    detok: Detokenizer,
    stops: StopStrings,
    events: EventSender,
    /// Tokens sampled but not yet sent (sent once per step, with their text).
    pending_tokens: Vec<u32>,
    pending_text: String,
    pub usage: Usage,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    pub finished: Option<StopReason>,
}

impl Seq {
    pub fn new(id: u64, req: ValidRequest, events: EventSender) -> Result<Self> {
        Ok(Self {
            id,
            sampler: Sampler::new(req.sampling.clone())?,
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
    pub fn accept(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        context_length: usize,
    ) -> Result<()> {
        let t = self.sampler.sample(logits, &self.tokens);
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
            self.usage.time_to_first_token = self.req.submitted.elapsed();
        }
        self.tokens.push(t);
        self.pending_tokens.push(t);
        let stop = if !self.req.ignore_eos && tok.is_eos(t) {
            Some(StopReason::Eos)
        } else if self.req.stop_token_ids.contains(&t) {
            Some(StopReason::StopToken)
        } else {
            let delta = self.detok.next(tok, t)?.unwrap_or_default();
            let (emit, hit) = self.stops.push(&delta);
            self.pending_text.push_str(&emit);
            hit.then_some(StopReason::StopString)
        };
        let stop = stop.or_else(|| {
            if self.generated() >= self.req.max_tokens {
                Some(StopReason::MaxTokens)
            } else if self.tokens.len() >= context_length {
                Some(StopReason::ContextFull)
            } else {
                None
            }
        });
        if let Some(reason) = stop {
            self.finish(reason, tok)?;
        }
        Ok(())
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
            }));
        }
        if let Some(reason) = self.finished {
            self.usage.completion_tokens = self.generated();
            self.usage.decode_time = self.first_token.map(|t| t.elapsed()).unwrap_or_default();
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
