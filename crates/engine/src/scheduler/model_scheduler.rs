//! One model's scheduler: its requests, its KV cache and prefix cache, and its runner. A step
//! snapshots the state, asks the policy for a `StepPlan` (`policy::schedule`), enacts it
//! (reap, admit, preempt, evict, reserve blocks), runs the forward pass (`ModelRunner`), then
//! applies the outputs: KV positions computed, prefixes cached, tokens sampled, events sent,
//! finished requests retired. Driven by the engine thread.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::policy::{self, Gone, KvState, NoRoom, RunningSeq, SchedState, Scheduled};
use super::policy::{ModelSchedulerConfig, StepPlan, WaitingSeq};
use super::prefix_cache::PrefixCache;
use super::runner::ModelRunner;
use super::sequence::Seq;
use super::stats::ModelSchedulerStats;
use crate::error::{Internal, KvShortage};
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::model::SeqInput;
use crate::stop::StopReason;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

pub(crate) struct ModelScheduler {
    name: String,
    runner: Box<dyn ModelRunner>,
    tokenizer: Tokenizer,
    context_length: usize,
    kv: KvCache,
    cache: PrefixCache,
    cfg: ModelSchedulerConfig,
    pub waiting: Vec<Seq>,
    pub running: Vec<Seq>,
    pub stats: ModelSchedulerStats,
}

impl ModelScheduler {
    pub fn new(model: LoadedModel, kv: KvCache, cfg: ModelSchedulerConfig) -> Self {
        let context_length = model.model.config().context_length;
        Self::with_runner(
            model.info.name,
            Box::new(model.model),
            model.tokenizer,
            context_length,
            kv,
            cfg,
        )
    }

    pub fn with_runner(
        name: String,
        runner: Box<dyn ModelRunner>,
        tokenizer: Tokenizer,
        context_length: usize,
        kv: KvCache,
        cfg: ModelSchedulerConfig,
    ) -> Self {
        Self {
            stats: ModelSchedulerStats::new(&name, kv.capacity_bytes()),
            cache: PrefixCache::new(kv.block_size()),
            name,
            runner,
            tokenizer,
            context_length,
            kv,
            cfg,
            waiting: Vec::new(),
            running: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn submit(&mut self, seq: Seq) {
        self.waiting.push(seq);
    }

    /// One scheduling step: at most one forward pass. Returns false when there was nothing
    /// to run.
    pub fn step(&mut self) -> bool {
        let plan = policy::schedule(&self.state(Instant::now()), &self.cfg);
        let batch = self.enact(&plan);
        if self.running.is_empty() {
            // Reaping may have freed the last running sequence's blocks.
            self.record_kv();
            return false;
        }
        if batch.is_empty() {
            return true;
        }
        let started = Instant::now();
        match self.forward(&batch) {
            Ok(rows) => self.apply(&batch, rows, started.elapsed()),
            Err(e) => self.fail_batch(&batch, e),
        }
        self.record_kv();
        true
    }

    /// The policy's view of this model now. Prefix-cache lookups and the evictable count
    /// are computed only when the policy can use them: they cost a walk of the cache.
    fn state(&self, now: Instant) -> SchedState<'_> {
        let kv = &self.kv;
        let bs = kv.block_size();
        let gone = |s: &Seq| {
            if s.is_abandoned() {
                Some(Gone::Abandoned)
            } else if s.past_deadline(now) {
                Some(Gone::Deadline)
            } else {
                None
            }
        };
        let running: Vec<RunningSeq> = self
            .running
            .iter()
            .map(|s| {
                // Blocks held alone, and (only the prefix cache shares a block with one
                // sequence) blocks shared with the cache alone.
                let (mut exclusive, mut cache_shared) = (0, 0);
                for &b in s.table.blocks() {
                    match kv.refcount(b) {
                        1 => exclusive += 1,
                        2 if self.cfg.prefix_cache => cache_shared += 1,
                        _ => {}
                    }
                }
                RunningSeq {
                    id: s.id,
                    priority: s.req.priority,
                    submitted: s.req.submitted,
                    tokens: &s.tokens,
                    computed: s.computed,
                    blocks: s.table.blocks().len(),
                    exclusive_blocks: exclusive,
                    cache_shared_blocks: cache_shared,
                    gone: gone(s),
                }
            })
            .collect();
        let staying = running.iter().filter(|r| r.gone.is_none()).count();
        let admitting = !self.waiting.is_empty() && staying < self.cfg.max_running;
        let lookups = admitting && self.cfg.prefix_cache;
        let waiting = self
            .waiting
            .iter()
            .map(|s| {
                let cached = if lookups {
                    self.cache.peek(&s.tokens, (s.tokens.len() - 1) / bs)
                } else {
                    Vec::new()
                };
                let cached_evictable = cached
                    .iter()
                    .copied()
                    .filter(|&b| kv.refcount(b) == 1)
                    .collect();
                WaitingSeq {
                    id: s.id,
                    priority: s.req.priority,
                    submitted: s.req.submitted,
                    tokens: &s.tokens,
                    cached,
                    cached_evictable,
                    gone: gone(s),
                }
            })
            .collect();
        // Running sequences grow by at most their remaining prompt: when that fits in the
        // free blocks and nothing is admitted, the cache is never asked to evict.
        let growth: usize = running
            .iter()
            .map(|r| kv.blocks_for(r.tokens.len()).saturating_sub(r.blocks))
            .sum();
        let evictable = if self.cfg.prefix_cache && (admitting || growth > kv.free_blocks()) {
            self.cache.evictable_blocks(kv)
        } else {
            0
        };
        SchedState {
            now,
            waiting,
            running,
            kv: KvState {
                block_size: bs,
                num_blocks: kv.num_blocks(),
                free: kv.free_blocks(),
                evictable,
            },
        }
    }

    /// Carries out the plan up to the forward pass; returns the batch to run (the plan's,
    /// less any sequence whose blocks could not be reserved: it runs at a later step).
    fn enact(&mut self, plan: &StepPlan) -> Vec<Scheduled> {
        for &(id, gone) in &plan.reap {
            let Some(mut s) = self.take(id) else { continue };
            match gone {
                Gone::Abandoned => self.stats.cancelled += 1,
                Gone::Deadline => {
                    let _ = s.finish(StopReason::Deadline, &self.tokenizer);
                    s.flush_events();
                }
            }
            self.kv.release(&mut s.table);
        }
        for &(id, why) in &plan.fail {
            let Some(mut s) = self.take(id) else { continue };
            let (cache_blocks, block_size) = (self.kv.num_blocks(), self.kv.block_size());
            s.fail(Error::OutOfMemory(match why {
                NoRoom::Prompt { blocks } => KvShortage::Prompt {
                    tokens: s.tokens.len(),
                    needed_blocks: blocks,
                    cache_blocks,
                    block_size,
                },
                NoRoom::Sequence { tokens } => KvShortage::Sequence {
                    tokens,
                    needed_blocks: self.kv.blocks_for(tokens),
                    cache_blocks,
                    block_size,
                },
            }));
            self.kv.release(&mut s.table);
        }
        let bs = self.kv.block_size();
        for a in &plan.admit {
            let Some(p) = self.waiting.iter().position(|s| s.id == a.id) else {
                continue;
            };
            let mut s = self.waiting.remove(p);
            if !a.cached.is_empty() {
                // Marks the prefix used (LRU); nothing was evicted since the plan looked.
                let touched = self.cache.lookup(&s.tokens, a.cached.len());
                debug_assert_eq!(touched, a.cached);
            }
            s.table = self.kv.adopt(&a.cached);
            s.computed = a.cached.len() * bs;
            self.stats.prompt_tokens += s.tokens.len() as u64;
            self.stats.cached_prompt_tokens += s.computed as u64;
            s.mark_admitted(s.computed);
            self.running.push(s);
        }
        for &id in &plan.preempt {
            let Some(p) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let mut s = self.running.swap_remove(p);
            // Recomputed from scratch when readmitted (its prefix may still be cached).
            self.kv.release(&mut s.table);
            s.computed = 0;
            s.usage.preemptions += 1;
            self.stats.preemptions += 1;
            self.waiting.push(s);
        }
        if plan.evict > 0 {
            let target = self.kv.free_blocks() + plan.evict;
            self.cache.evict(&mut self.kv, target);
        }
        let mut batch = Vec::with_capacity(plan.run.len());
        for r in &plan.run {
            let Some(s) = self.running.iter_mut().find(|s| s.id == r.id) else {
                continue;
            };
            if let Err(e) = self.kv.reserve(&mut s.table, s.computed + r.tokens) {
                // The plan counts blocks, not which ones: a rare overcount waits a step.
                tracing::debug!(id = r.id, error = %e, "planned sequence deferred");
                continue;
            }
            batch.push(*r);
        }
        batch
    }

    /// Removes a sequence, waiting or running.
    fn take(&mut self, id: u64) -> Option<Seq> {
        for list in [&mut self.waiting, &mut self.running] {
            if let Some(p) = list.iter().position(|s| s.id == id) {
                return Some(list.swap_remove(p));
            }
        }
        None
    }

    /// The forward pass over `batch`: one logits row per sequence whose prompt it completes,
    /// checked before anything is updated.
    fn forward(&mut self, batch: &[Scheduled]) -> Result<Vec<Vec<f32>>> {
        let running = &self.running;
        // The plan comes from this state, so every id runs and every range fits; a plan
        // that broke that would be our bug, failing the step instead of the engine thread.
        let inputs = batch
            .iter()
            .map(|r| {
                let s = running.iter().find(|s| s.id == r.id).ok_or_else(|| {
                    candle_core::Error::Msg(format!("planned request {} is not running", r.id))
                })?;
                let tokens = s
                    .tokens
                    .get(s.computed..s.computed + r.tokens)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "planned {} tokens of request {} past its {}",
                            r.tokens,
                            r.id,
                            s.tokens.len()
                        ))
                    })?;
                Ok(SeqInput {
                    tokens,
                    start_pos: s.computed,
                    table: &s.table,
                    logits: s.computed + r.tokens == s.tokens.len(),
                })
            })
            .collect::<Result<Vec<SeqInput>>>()?;
        let wanted = inputs.iter().filter(|i| i.logits).count();
        let rows = self.runner.forward(&inputs, &self.kv)?;
        if rows.len() != wanted {
            return Err(candle_core::Error::Msg(format!(
                "the model returned {} logits rows for {wanted} sequences",
                rows.len()
            ))
            .into());
        }
        Ok(rows)
    }

    /// A failed forward pass fails the requests in it, not the engine: each gets the error
    /// and gives back its blocks; nothing of the step was applied to them.
    fn fail_batch(&mut self, batch: &[Scheduled], e: Error) {
        let e = Arc::new(e);
        for r in batch {
            if let Some(p) = self.running.iter().position(|s| s.id == r.id) {
                let mut s = self.running.swap_remove(p);
                s.fail(Internal::ForwardPass(e.clone()).into());
                self.kv.release(&mut s.table);
            }
        }
    }

    /// Applies a step's outputs: positions computed, whole blocks cached, one token sampled
    /// per completed prompt or decode, events sent, finished requests retired. A request
    /// whose sampling fails ends with that error; the others go on.
    fn apply(&mut self, batch: &[Scheduled], rows: Vec<Vec<f32>>, took: Duration) {
        let step_tokens: usize = batch.iter().map(|r| r.tokens).sum();
        self.stats.record_step(batch.len(), step_tokens, took);
        let bs = self.kv.block_size();
        let mut rows = rows.into_iter();
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; self.running.len()];
        let mut positions = Vec::with_capacity(batch.len());
        for r in batch {
            // forward() found every one running, and nothing ran in between.
            let Some(p) = self.running.iter().position(|s| s.id == r.id) else {
                continue;
            };
            positions.push(p);
            let s = &mut self.running[p];
            let before = s.computed / bs;
            s.computed += r.tokens;
            let full = s.computed / bs;
            if self.cfg.prefix_cache && full > before {
                self.cache.insert(
                    &s.tokens[..full * bs],
                    &s.table.blocks()[..full],
                    &mut self.kv,
                );
            }
            if s.computed == s.tokens.len() {
                logits[p] = rows.next();
            }
        }
        // Grammar masks, sampling, detokenization and stop strings, one sequence per work
        // item on the thread pool: over a large batch they were a serial tail of every step.
        let (tok, ctx) = (&self.tokenizer, self.context_length);
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
        let mut failed = Vec::new();
        for a in work {
            let a = a.into_inner().unwrap_or_else(|e| e.into_inner());
            match a.added {
                Ok(n) => self.stats.completion_tokens += n as u64,
                Err(e) => failed.push((a.seq.id, e)),
            }
        }
        for &p in &positions {
            let s = &mut self.running[p];
            if !failed.iter().any(|(id, _)| *id == s.id) {
                s.flush_events();
            }
        }
        for (id, e) in failed {
            let Some(p) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let mut s = self.running.swap_remove(p);
            s.fail(e);
            self.kv.release(&mut s.table);
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
    }

    fn record_kv(&mut self) {
        self.stats.kv_used_bytes = self.kv.used_bytes();
        let block_bytes = self.kv.capacity_bytes() / self.kv.num_blocks().max(1);
        self.stats.kv_cached_bytes = self.cache.cached_blocks() * block_bytes;
        self.stats.kv_active_bytes = self
            .stats
            .kv_used_bytes
            .saturating_sub(self.cache.evictable_blocks(&self.kv) * block_bytes);
    }
}

/// One sequence's sampling step, run on the thread pool.
struct Accept<'a> {
    seq: &'a mut Seq,
    row: Vec<f32>,
    added: Result<usize>,
}

#[cfg(test)]
#[path = "model_scheduler_tests.rs"]
mod tests;
