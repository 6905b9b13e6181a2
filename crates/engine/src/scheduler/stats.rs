//! What the scheduler is doing, as a snapshot (`LlmClient::stats`): the server exports it as
//! metrics.

use std::time::Duration;

use serde::Serialize;

/// Batch sizes are counted in these buckets (upper bounds; the last is open).
pub const BATCH_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, usize::MAX];

/// One model's scheduler: its queue, its steps, its tokens and its KV cache.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSchedulerStats {
    pub model: String,
    pub waiting: usize,
    pub running: usize,
    pub steps: u64,
    /// Forward passes by number of sequences in them, per `BATCH_BUCKETS`.
    pub batch_histogram: Vec<u64>,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Tokens (prompt and completion) computed per second of forward passes.
    pub tokens_per_s: f64,
    pub busy_s: f64,
    pub kv_used_bytes: usize,
    /// Of `kv_used_bytes`, the blocks the prefix cache holds: with nothing running, KV use is
    /// back to this idle level.
    pub kv_cached_bytes: usize,
    /// Of `kv_used_bytes`, the blocks some sequence holds: what eviction cannot free (vLLM's
    /// KV usage, which counts blocks only the prefix cache keeps as free).
    pub kv_active_bytes: usize,
    pub kv_budget_bytes: usize,
    pub preemptions: u64,
    pub finished: u64,
    pub cancelled: u64,
    #[serde(skip)]
    computed_tokens: u64,
}

impl ModelSchedulerStats {
    pub fn new(model: &str, kv_budget_bytes: usize) -> Self {
        Self {
            model: model.to_string(),
            waiting: 0,
            running: 0,
            steps: 0,
            batch_histogram: vec![0; BATCH_BUCKETS.len()],
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            tokens_per_s: 0.0,
            busy_s: 0.0,
            kv_used_bytes: 0,
            kv_cached_bytes: 0,
            kv_active_bytes: 0,
            kv_budget_bytes,
            preemptions: 0,
            finished: 0,
            cancelled: 0,
            computed_tokens: 0,
        }
    }

    pub fn record_step(&mut self, seqs: usize, tokens: usize, took: Duration) {
        self.steps += 1;
        let bucket = BATCH_BUCKETS
            .iter()
            .position(|&b| seqs <= b)
            .unwrap_or(BATCH_BUCKETS.len() - 1);
        self.batch_histogram[bucket] += 1;
        self.busy_s += took.as_secs_f64();
        self.computed_tokens += tokens as u64;
        if self.busy_s > 0.0 {
            self.tokens_per_s = self.computed_tokens as f64 / self.busy_s;
        }
    }

    /// Share of prompt tokens served from the prefix cache.
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_prompt_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// The whole engine: totals over its models, and each model's own.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub waiting: usize,
    pub running: usize,
    pub models: Vec<ModelSchedulerStats>,
}

impl Stats {
    pub fn prefix_hit_rate(&self) -> f64 {
        let (p, c) = self.models.iter().fold((0, 0), |(p, c), m| {
            (p + m.prompt_tokens, c + m.cached_prompt_tokens)
        });
        if p == 0 {
            0.0
        } else {
            c as f64 / p as f64
        }
    }
}
