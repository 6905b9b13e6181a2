//! A synchronous generation loop over many sequences at once: every step runs one forward
//! pass that mixes prompt chunks of sequences still prefilling with one decode token of each
//! sequence already generating. `forgeline prompt` and the engine benchmark use it; the
//! scheduler builds continuous batching across requests on the same pieces.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::kv_cache::{BlockTable, KvCache};
use crate::loader::LoadedModel;
use crate::model::SeqInput;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::TokenStream;
use crate::{Error, Result};

#[derive(Clone, Debug, Default)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Keep generating past the model's end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopToken,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Clone, Debug)]
pub struct GenOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

/// Holds back text that may be the start of a stop string, and finds complete ones.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds `delta`; returns the text now safe to emit and whether a stop string was hit
    /// (the stop string and anything after it are dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Longest suffix of `pending` that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

enum Phase {
    Prefill(usize),
    Decode,
    Done(StopReason),
}

struct Seq<'t> {
    req: GenRequest,
    table: BlockTable,
    phase: Phase,
    history: Vec<u32>,
    output: Vec<u32>,
    text: String,
    sampler: Sampler,
    stream: TokenStream<'t>,
    stops: StopStrings,
    started: Instant,
    first_token: Option<Duration>,
    finished: Option<Duration>,
}

/// Runs `reqs` to completion together. `step_tokens` bounds the tokens of one forward pass
/// (decode tokens first, prompt chunks fill the rest). `on_text(i, delta)` streams the text
/// of request `i` as it is produced.
pub fn generate(
    m: &LoadedModel,
    kv: &mut KvCache,
    reqs: Vec<GenRequest>,
    step_tokens: usize,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<GenOutput>> {
    let ctx = m.model.config().context_length;
    let mut seqs = Vec::with_capacity(reqs.len());
    for (i, req) in reqs.into_iter().enumerate() {
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "request {i}: the prompt is empty"
            )));
        }
        if req.prompt.len() >= ctx {
            return Err(Error::InvalidRequest(format!(
                "request {i}: the prompt has {} tokens, the context holds {ctx}",
                req.prompt.len()
            )));
        }
        if req.max_tokens == 0 {
            return Err(Error::InvalidRequest(format!(
                "request {i}: `max_tokens` must be at least 1"
            )));
        }
        seqs.push(Seq {
            sampler: Sampler::new(req.sampling.clone())?,
            stops: StopStrings::new(req.stop_strings.clone()),
            history: req.prompt.clone(),
            req,
            table: BlockTable::default(),
            phase: Phase::Prefill(0),
            output: Vec::new(),
            text: String::new(),
            stream: m.tokenizer.stream(),
            started: Instant::now(),
            first_token: None,
            finished: None,
        });
    }
    let result = run(m, kv, &mut seqs, step_tokens.max(1), &mut on_text);
    for s in &mut seqs {
        kv.release(&mut s.table);
    }
    result?;
    Ok(seqs
        .into_iter()
        .map(|s| GenOutput {
            prompt_tokens: s.req.prompt.len(),
            tokens: s.output,
            text: s.text,
            stop_reason: match s.phase {
                Phase::Done(r) => r,
                _ => StopReason::MaxTokens,
            },
            time_to_first_token: s.first_token.unwrap_or_default(),
            total_time: s.finished.unwrap_or_else(|| s.started.elapsed()),
        })
        .collect())
}

fn run(
    m: &LoadedModel,
    kv: &mut KvCache,
    seqs: &mut [Seq],
    step_tokens: usize,
    on_text: &mut impl FnMut(usize, &str),
) -> Result<()> {
    let ctx = m.model.config().context_length;
    loop {
        // Plan the step: (sequence, start position, token count).
        let mut plan: Vec<(usize, usize, usize)> = Vec::new();
        let mut budget = step_tokens;
        for (i, s) in seqs.iter().enumerate() {
            if matches!(s.phase, Phase::Decode) && budget > 0 {
                plan.push((i, s.history.len() - 1, 1));
                budget -= 1;
            }
        }
        for (i, s) in seqs.iter().enumerate() {
            if let Phase::Prefill(done) = s.phase {
                if budget == 0 {
                    break;
                }
                let n = (s.req.prompt.len() - done).min(budget);
                plan.push((i, done, n));
                budget -= n;
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        for &(i, start, n) in &plan {
            kv.reserve(&mut seqs[i].table, start + n)?;
        }
        let inputs: Vec<SeqInput> = plan
            .iter()
            .map(|&(i, start, n)| SeqInput {
                tokens: &seqs[i].history[start..start + n],
                start_pos: start,
                table: &seqs[i].table,
                logits: start + n == seqs[i].history.len(),
            })
            .collect();
        let logits = m.model.forward(&inputs, kv)?;
        let mut rows = logits.to_vec2::<f32>()?.into_iter();
        drop(inputs);
        for (i, start, n) in plan {
            let s = &mut seqs[i];
            if start + n < s.history.len() {
                s.phase = Phase::Prefill(start + n);
                continue;
            }
            let mut row = rows.next().expect("one logits row per finished chunk");
            let tok = s.sampler.sample(&mut row, &s.history);
            if s.first_token.is_none() {
                s.first_token = Some(s.started.elapsed());
            }
            s.history.push(tok);
            s.output.push(tok);
            let eos = !s.req.ignore_eos && m.tokenizer.is_eos(tok);
            let mut stop = if eos {
                Some(StopReason::Eos)
            } else if s.req.stop_token_ids.contains(&tok) {
                Some(StopReason::StopToken)
            } else {
                None
            };
            if stop.is_none() {
                let delta = s.stream.next(tok)?.unwrap_or_default();
                let (emit, hit) = s.stops.push(&delta);
                if !emit.is_empty() {
                    on_text(i, &emit);
                    s.text.push_str(&emit);
                }
                if hit {
                    stop = Some(StopReason::StopString);
                }
            }
            if stop.is_none() && s.output.len() >= s.req.max_tokens {
                stop = Some(StopReason::MaxTokens);
            }
            if stop.is_none() && s.history.len() >= ctx {
                stop = Some(StopReason::ContextFull);
            }
            match stop {
                None => s.phase = Phase::Decode,
                Some(reason) => {
                    if reason != StopReason::StopString {
                        let mut tail = s.stream.flush()?.unwrap_or_default();
                        let (emit, _) = s.stops.push(&tail);
                        tail = emit + &s.stops.finish();
                        if !tail.is_empty() {
                            on_text(i, &tail);
                            s.text.push_str(&tail);
                        }
                    }
                    s.phase = Phase::Done(reason);
                    s.finished = Some(s.started.elapsed());
                    kv.release(&mut s.table);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stop_strings_hold_back_partial_matches_and_cut_at_the_match() {
        let mut s = StopStrings::new(vec!["```".into(), "\nEND".into()]);
        assert_eq!(s.push("def f():"), ("def f():".into(), false));
        assert_eq!(s.push(" pass`"), (" pass".into(), false));
        assert_eq!(s.push("`"), (String::new(), false));
        assert_eq!(s.push("` tail"), (String::new(), true));
        let mut s = StopStrings::new(vec!["\nEND".into()]);
        assert_eq!(s.push("a\nE"), ("a".into(), false));
        assert_eq!(s.push("x"), ("\nEx".into(), false));
        assert_eq!(s.push("\n"), (String::new(), false));
        assert_eq!(s.finish(), "\n");
    }
}
