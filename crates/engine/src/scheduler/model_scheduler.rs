//! One loaded model and the requests running on it: admission (priority classes with
//! ageing, prefix reuse, KV budget), step planning (decodes first, prompt chunks fill the
//! token budget), preemption by recomputation, and the forward pass. Driven by the engine
//! thread, or synchronously by `generate`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::prefix_cache::PrefixCache;
use super::sequence::Seq;
use super::stats::SlotStats;
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::model::SeqInput;
use crate::stop::StopReason;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct SlotConfig {
    /// Tokens in one forward pass (decode tokens plus prompt chunks).
    pub step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Reuse cached KV of shared prompt prefixes.
    pub prefix_cache: bool,
}

impl Default for SlotConfig {
    fn default() -> Self {
        Self {
            step_tokens: 512,
            max_running: 32,
            prefix_cache: true,
        }
    }
}

/// A waiting request gains one priority class per this much waiting.
pub const AGEING: Duration = Duration::from_secs(2);

pub(crate) struct Slot {
    pub model: LoadedModel,
    pub kv: KvCache,
    cache: PrefixCache,
    cfg: SlotConfig,
    pub waiting: Vec<Seq>,
    pub running: Vec<Seq>,
    pub stats: SlotStats,
}

impl Slot {
    pub fn new(model: LoadedModel, kv: KvCache, cfg: SlotConfig) -> Self {
        let cache = PrefixCache::new(kv.block_size());
        Self {
            stats: SlotStats::new(&model.info.name, kv.capacity_bytes()),
            model,
            kv,
            cache,
            cfg,
            waiting: Vec::new(),
            running: Vec::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn submit(&mut self, seq: Seq) {
        self.waiting.push(seq);
    }

    /// Lower is more urgent: the class rank, less one per `AGEING` waited.
    fn urgency(seq: &Seq, now: Instant) -> (i64, Instant) {
        let aged = now.duration_since(seq.req.submitted).as_secs_f64() / AGEING.as_secs_f64();
        (
            seq.req.priority.rank() as i64 - aged as i64,
            seq.req.submitted,
        )
    }

    /// Ends abandoned and overdue requests, freeing their blocks.
    fn reap(&mut self, now: Instant) {
        for list in [&mut self.waiting, &mut self.running] {
            let mut i = 0;
            while i < list.len() {
                let s = &mut list[i];
                if s.is_abandoned() {
                    self.stats.cancelled += 1;
                } else if s.past_deadline(now) {
                    let _ = s.finish(StopReason::Deadline, &self.model.tokenizer);
                    s.flush_events();
                } else {
                    i += 1;
                    continue;
                }
                let mut s = list.swap_remove(i);
                self.kv.release(&mut s.table);
            }
        }
    }

    /// Frees at least `blocks` blocks: first from the prefix cache, then by preempting the
    /// least urgent running sequence other than `keep`. False when nothing more can go.
    fn make_room(&mut self, blocks: usize, keep: u64) -> bool {
        while self.kv.free_blocks() < blocks {
            if self.cache.evict(&mut self.kv, blocks) > 0 {
                continue;
            }
            let now = Instant::now();
            let victim = self
                .running
                .iter()
                .enumerate()
                .filter(|(_, s)| s.id != keep)
                .max_by_key(|(_, s)| Self::urgency(s, now))
                .map(|(i, _)| i);
            let Some(i) = victim else {
                return false;
            };
            let mut s = self.running.swap_remove(i);
            // Recomputed from scratch when readmitted (its prefix may still be cached).
            self.kv.release(&mut s.table);
            s.computed = 0;
            s.usage.preemptions += 1;
            self.stats.preemptions += 1;
            self.waiting.push(s);
        }
        true
    }

    /// Moves waiting requests into the running set while there is room.
    fn admit(&mut self) {
        let bs = self.kv.block_size();
        let now = Instant::now();
        self.waiting.sort_by_key(|s| Self::urgency(s, now));
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.cfg.max_running {
            let tokens = &self.waiting[i].tokens;
            let len = tokens.len();
            // Leave at least one token to compute: its logits start the answer.
            let max_blocks = (len - 1) / bs;
            let cached = if self.cfg.prefix_cache {
                self.cache.lookup(tokens, max_blocks)
            } else {
                Vec::new()
            };
            // A running prompt that shares more than the cache holds will soon be cached:
            // wait for it rather than compute the same prefix twice.
            let shared_inflight = self
                .running
                .iter()
                .filter(|r| r.computed < r.tokens.len())
                .map(|r| common_prefix(&r.tokens, tokens) / bs)
                .max()
                .unwrap_or(0)
                .min(max_blocks);
            if self.cfg.prefix_cache && shared_inflight > cached.len() {
                i += 1;
                continue;
            }
            let total = self.kv.blocks_for(len + 1);
            let need = total - cached.len();
            if self.kv.free_blocks() < need {
                self.cache.evict(&mut self.kv, need);
            }
            if self.kv.free_blocks() < need {
                if self.running.is_empty() && self.kv.num_blocks() < total {
                    let s = self.waiting.remove(i);
                    s.fail(Error::OutOfMemory(format!(
                        "the prompt needs {total} KV blocks; the cache has {} in all",
                        self.kv.num_blocks()
                    )));
                    continue;
                }
                break;
            }
            let mut s = self.waiting.remove(i);
            s.table = self.kv.adopt(&cached);
            s.computed = cached.len() * bs;
            self.stats.prompt_tokens += s.tokens.len() as u64;
            self.stats.cached_prompt_tokens += s.computed as u64;
            s.mark_admitted(s.computed);
            self.running.push(s);
        }
    }

    /// One scheduling step: at most one forward pass. Returns false when there was nothing
    /// to run.
    pub fn step(&mut self) -> Result<bool> {
        let now = Instant::now();
        self.reap(now);
        self.admit();
        if self.running.is_empty() {
            // Reaping may have freed the last running sequence's blocks.
            self.record_kv();
            return Ok(false);
        }
        // Decodes first (most urgent first), then prompt chunks in the remaining budget.
        self.running
            .sort_by_key(|s| (s.computed < s.tokens.len() - 1, Self::urgency(s, now)));
        let mut plan: Vec<(u64, usize)> = Vec::new();
        let mut budget = self.cfg.step_tokens.max(1);
        let ids: Vec<(u64, usize, usize)> = self
            .running
            .iter()
            .map(|s| (s.id, s.computed, s.tokens.len()))
            .collect();
        for (id, computed, len) in ids {
            if budget == 0 {
                break;
            }
            let n = (len - computed).min(budget);
            let Some(pos) = self.running.iter().position(|s| s.id == id) else {
                continue; // preempted while making room for an earlier one
            };
            let need = self
                .kv
                .blocks_for(computed + n)
                .saturating_sub(self.running[pos].table.blocks().len());
            if need > 0 && !self.make_room(need, id) {
                let s = self.running.remove(pos);
                s.fail(Error::OutOfMemory(format!(
                    "a sequence of {} tokens does not fit in the KV cache ({} blocks of {})",
                    computed + n,
                    self.kv.num_blocks(),
                    self.kv.block_size()
                )));
                continue;
            }
            let Some(pos) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let s = &mut self.running[pos];
            self.kv.reserve(&mut s.table, computed + n)?;
            plan.push((id, n));
            budget -= n;
        }
        // Preemption may have removed planned sequences after they were planned.
        plan.retain(|(id, _)| self.running.iter().any(|s| s.id == *id));
        if plan.is_empty() {
            return Ok(true);
        }
        let positions: Vec<usize> = plan
            .iter()
            .map(|(id, _)| {
                self.running
                    .iter()
                    .position(|s| s.id == *id)
                    .expect("retained")
            })
            .collect();
        let inputs: Vec<SeqInput> = plan
            .iter()
            .zip(&positions)
            .map(|(&(_, n), &p)| {
                let s = &self.running[p];
                SeqInput {
                    tokens: &s.tokens[s.computed..s.computed + n],
                    start_pos: s.computed,
                    table: &s.table,
                    logits: s.computed + n == s.tokens.len(),
                }
            })
            .collect();
        let started = Instant::now();
        let result = self
            .model
            .model
            .forward(&inputs, &self.kv)
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        drop(inputs);
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                // A failed step fails the requests in it, not the engine.
                let e = std::sync::Arc::new(e);
                for (id, _) in &plan {
                    if let Some(p) = self.running.iter().position(|s| s.id == *id) {
                        let mut s = self.running.swap_remove(p);
                        s.fail(crate::error::Internal::ForwardPass(e.clone()).into());
                        self.kv.release(&mut s.table);
                    }
                }
                return Ok(true);
            }
        };
        let step_tokens: usize = plan.iter().map(|(_, n)| n).sum();
        self.stats
            .record_step(plan.len(), step_tokens, started.elapsed());
        let mut rows = rows.into_iter();
        let ctx = self.model.model.config().context_length;
        let bs = self.kv.block_size();
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; self.running.len()];
        for (&(_, n), &p) in plan.iter().zip(&positions) {
            let s = &mut self.running[p];
            let before = s.computed / bs;
            s.computed += n;
            let full = s.computed / bs;
            if self.cfg.prefix_cache && full > before {
                self.cache.insert(
                    &s.tokens[..full * bs],
                    &s.table.blocks()[..full],
                    &mut self.kv,
                );
            }
            if s.computed == s.tokens.len() {
                logits[p] = Some(rows.next().expect("a logits row per completed chunk"));
            }
        }
        // Grammar masks, sampling, detokenization and stop strings, one sequence per work
        // item on the thread pool: over a large batch they were a serial tail of every step.
        let tok = &self.model.tokenizer;
        let work: Vec<Mutex<Accept>> = self
            .running
            .iter_mut()
            .zip(logits)
            .filter_map(|(seq, row)| {
                row.map(|row| {
                    Mutex::new(Accept {
                        seq,
                        row,
                        added: Ok(0),
                    })
                })
            })
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(work.len(), |items| {
            for i in items {
                let mut guard = work[i].lock().unwrap_or_else(|e| e.into_inner());
                let a = &mut *guard;
                a.added = a.seq.accept(&mut a.row, tok, ctx);
            }
        });
        for a in work {
            let a = a.into_inner().unwrap_or_else(|e| e.into_inner());
            self.stats.completion_tokens += a.added? as u64;
        }
        for &p in &positions {
            self.running[p].flush_events();
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished.is_some() {
                let mut s = self.running.swap_remove(i);
                self.kv.release(&mut s.table);
                self.stats.finished += 1;
            } else {
                i += 1;
            }
        }
        self.record_kv();
        Ok(true)
    }

    fn record_kv(&mut self) {
        self.stats.kv_used_bytes = self.kv.used_bytes();
        self.stats.kv_cached_bytes =
            self.cache.cached_blocks() * self.kv.capacity_bytes() / self.kv.num_blocks().max(1);
    }
}

/// One sequence's sampling step, run on the thread pool.
struct Accept<'a> {
    seq: &'a mut Seq,
    row: Vec<f32>,
    added: Result<usize>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
