//! The scheduling policy as a pure function, as in vLLM v1: `schedule` reads a snapshot of one
//! model's requests and KV cache (`SchedState`, plain data) and returns a `StepPlan`: who is
//! reaped, admitted (reusing which cached prefix) or held back for an in-flight prefix, who is
//! preempted, and who runs with how many tokens. `ModelScheduler` enacts the plan; nothing here
//! touches a sequence, a block or a model, so the rules are unit-tested on constructed states.
//!
//! The KV cache is accounted in blocks: `free` ones, and `evictable` ones that only the prefix
//! cache holds. Admitting a request adopts its cached prefix (those blocks stop being
//! evictable); preempting one gives back its blocks (held alone: free; shared only with the
//! prefix cache: evictable).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::request::Priority;

/// A waiting request gains one priority class per this much waiting.
pub const AGEING: Duration = Duration::from_secs(2);

/// The knobs of the policy: one model's scheduler's settings (`SchedulerConfig::per_model`).
#[derive(Clone, Debug)]
pub struct ModelSchedulerConfig {
    /// Tokens in one forward pass (decode tokens plus prompt chunks).
    pub step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Reuse cached KV of shared prompt prefixes.
    pub prefix_cache: bool,
}

impl Default for ModelSchedulerConfig {
    fn default() -> Self {
        Self {
            step_tokens: 512,
            max_running: 32,
            prefix_cache: true,
        }
    }
}

/// Why a request leaves without running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// Whoever asked dropped the stream.
    Abandoned,
    /// Past its deadline: it ends with what it has.
    Deadline,
}

/// A request the policy may admit.
#[derive(Clone, Debug)]
pub struct WaitingSeq<'a> {
    pub id: u64,
    pub priority: Priority,
    pub submitted: Instant,
    /// Prompt and tokens generated before a preemption: all to compute.
    pub tokens: &'a [u32],
    /// The KV blocks of its longest cached prefix (whole blocks, leaving one token to compute).
    pub cached: Vec<u32>,
    /// Of `cached`, the blocks only the prefix cache holds (evictable until adopted).
    pub cached_evictable: Vec<u32>,
    pub gone: Option<Gone>,
}

/// A request with KV blocks, computing its prompt or decoding.
#[derive(Clone, Debug)]
pub struct RunningSeq<'a> {
    pub id: u64,
    pub priority: Priority,
    pub submitted: Instant,
    pub tokens: &'a [u32],
    /// Positions whose KV is computed.
    pub computed: usize,
    /// Blocks in its table.
    pub blocks: usize,
    /// Of `blocks`, those it holds alone: free once it lets go.
    pub exclusive_blocks: usize,
    /// Of `blocks`, those shared with the prefix cache alone: evictable once it lets go.
    pub cache_shared_blocks: usize,
    pub gone: Option<Gone>,
}

/// The KV cache in blocks.
#[derive(Clone, Debug)]
pub struct KvState {
    pub block_size: usize,
    pub num_blocks: usize,
    pub free: usize,
    /// Blocks the prefix cache could evict now.
    pub evictable: usize,
}

impl KvState {
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// What `schedule` reads.
#[derive(Clone, Debug)]
pub struct SchedState<'a> {
    pub now: Instant,
    pub waiting: Vec<WaitingSeq<'a>>,
    pub running: Vec<RunningSeq<'a>>,
    pub kv: KvState,
}

/// A waiting request that becomes running, adopting these cached blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    pub id: u64,
    pub cached: Vec<u32>,
}

/// A request in the forward pass: the next `tokens` positions of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: u64,
    pub tokens: usize,
}

/// Why a request can never run in this cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Its prompt needs more blocks than the cache has.
    Prompt { blocks: usize },
    /// Grown to `tokens`, it no longer fits with nothing left to preempt.
    Sequence { tokens: usize },
}

/// One step's decisions, applied in this order: reap, fail, admit, preempt, evict, reserve
/// and run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub reap: Vec<(u64, Gone)>,
    pub admit: Vec<Admission>,
    /// Held back: a running prompt is computing their prefix, which they reuse once cached.
    pub wait_for_prefix: Vec<u64>,
    /// Running (or just admitted) requests sent back to wait, to be recomputed.
    pub preempt: Vec<u64>,
    pub fail: Vec<(u64, NoRoom)>,
    /// Blocks to evict from the prefix cache.
    pub evict: usize,
    /// The forward pass: decodes first, then prompt chunks, within the token budget.
    pub run: Vec<Scheduled>,
}

/// Lower is more urgent: the class rank, less one per `AGEING` waited; then the older.
pub fn urgency(priority: Priority, submitted: Instant, now: Instant) -> (i64, Instant) {
    let aged = now.duration_since(submitted).as_secs_f64() / AGEING.as_secs_f64();
    (priority.rank() as i64 - aged as i64, submitted)
}

/// A running request as the plan sees it while deciding.
struct Sim<'a> {
    id: u64,
    urgency: (i64, Instant),
    tokens: &'a [u32],
    computed: usize,
    blocks: usize,
    exclusive: usize,
    cache_shared: usize,
}

/// The blocks the plan has left.
struct Room {
    free: usize,
    evictable: usize,
    evicted: usize,
}

impl Room {
    /// Evicts cached blocks until `need` are free or none is left to evict; true if any went.
    fn evict_for(&mut self, need: usize) -> bool {
        let n = need.saturating_sub(self.free).min(self.evictable);
        self.free += n;
        self.evictable -= n;
        self.evicted += n;
        n > 0
    }
}

/// Decides one step. Pure: the same state gives the same plan.
pub fn schedule(state: &SchedState, cfg: &ModelSchedulerConfig) -> StepPlan {
    let kv = &state.kv;
    let bs = kv.block_size;
    let mut plan = StepPlan::default();
    let mut room = Room {
        free: kv.free,
        evictable: kv.evictable,
        evicted: 0,
    };
    let mut running: Vec<Sim> = Vec::with_capacity(state.running.len());
    for r in &state.running {
        match r.gone {
            Some(g) => {
                plan.reap.push((r.id, g));
                room.free += r.exclusive_blocks;
                room.evictable += r.cache_shared_blocks;
            }
            None => running.push(Sim {
                id: r.id,
                urgency: urgency(r.priority, r.submitted, state.now),
                tokens: r.tokens,
                computed: r.computed,
                blocks: r.blocks,
                exclusive: r.exclusive_blocks,
                cache_shared: r.cache_shared_blocks,
            }),
        }
    }
    let mut waiting: Vec<&WaitingSeq> = Vec::with_capacity(state.waiting.len());
    for w in &state.waiting {
        match w.gone {
            Some(g) => plan.reap.push((w.id, g)),
            None => waiting.push(w),
        }
    }
    waiting.sort_by_key(|w| urgency(w.priority, w.submitted, state.now));

    // Admission, most urgent first, while there is room.
    let mut adopted: HashSet<u32> = HashSet::new();
    for w in waiting {
        if running.len() >= cfg.max_running {
            break;
        }
        let len = w.tokens.len();
        // Leave at least one token to compute: its logits start the answer.
        let max_blocks = (len - 1) / bs;
        let cached: &[u32] = if cfg.prefix_cache {
            &w.cached[..w.cached.len().min(max_blocks)]
        } else {
            &[]
        };
        // A running prompt that shares more than the cache holds will soon be cached: wait
        // for it rather than compute the same prefix twice.
        let shared_inflight = running
            .iter()
            .filter(|r| r.computed < r.tokens.len())
            .map(|r| common_prefix(r.tokens, w.tokens) / bs)
            .max()
            .unwrap_or(0)
            .min(max_blocks);
        if cfg.prefix_cache && shared_inflight > cached.len() {
            plan.wait_for_prefix.push(w.id);
            continue;
        }
        let total = kv.blocks_for(len + 1);
        let need = total - cached.len();
        // Its cached blocks are adopted before anything is evicted, so they cannot make room.
        let newly: Vec<u32> = w
            .cached_evictable
            .iter()
            .copied()
            .filter(|b| cached.contains(b) && !adopted.contains(b))
            .collect();
        let protected = newly.len().min(room.evictable);
        room.evictable -= protected;
        if room.free < need {
            room.evict_for(need);
        }
        if room.free < need {
            room.evictable += protected;
            if running.is_empty() && kv.num_blocks < total {
                plan.fail.push((w.id, NoRoom::Prompt { blocks: total }));
                continue;
            }
            break;
        }
        adopted.extend(newly);
        plan.admit.push(Admission {
            id: w.id,
            cached: cached.to_vec(),
        });
        running.push(Sim {
            id: w.id,
            urgency: urgency(w.priority, w.submitted, state.now),
            tokens: w.tokens,
            computed: cached.len() * bs,
            blocks: cached.len(),
            exclusive: 0,
            cache_shared: protected,
        });
    }

    // Decodes first (most urgent first), then prompt chunks in the remaining budget.
    running.sort_by_key(|s| (s.computed < s.tokens.len() - 1, s.urgency));
    let order: Vec<u64> = running.iter().map(|s| s.id).collect();
    let mut budget = cfg.step_tokens.max(1);
    for id in order {
        if budget == 0 {
            break;
        }
        let Some(pos) = running.iter().position(|s| s.id == id) else {
            continue; // preempted while making room for an earlier one
        };
        let s = &running[pos];
        let n = (s.tokens.len() - s.computed).min(budget);
        let need = kv.blocks_for(s.computed + n).saturating_sub(s.blocks);
        if need > 0 && !make_room(&mut room, &mut running, &mut plan, need, id) {
            // make_room never takes `id` itself, so it is still at `pos` or before it.
            if let Some(pos) = running.iter().position(|s| s.id == id) {
                let s = running.remove(pos);
                plan.fail.push((
                    id,
                    NoRoom::Sequence {
                        tokens: s.computed + n,
                    },
                ));
            }
            continue;
        }
        let Some(s) = running.iter_mut().find(|s| s.id == id) else {
            continue;
        };
        room.free -= need;
        s.blocks += need;
        s.exclusive += need;
        plan.run.push(Scheduled { id, tokens: n });
        budget -= n;
    }
    // Preemption may have removed requests after they were planned (their budget stays spent).
    let preempted = &plan.preempt;
    plan.run.retain(|r| !preempted.contains(&r.id));
    plan.evict = room.evicted;
    plan
}

/// Frees `need` blocks: first from the prefix cache, then by preempting the least urgent
/// running request other than `keep`. False when nothing more can go.
fn make_room(
    room: &mut Room,
    running: &mut Vec<Sim>,
    plan: &mut StepPlan,
    need: usize,
    keep: u64,
) -> bool {
    while room.free < need {
        if room.evict_for(need) {
            continue;
        }
        let victim = running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.id != keep)
            .max_by_key(|(_, s)| s.urgency)
            .map(|(i, _)| i);
        let Some(i) = victim else {
            return false;
        };
        let v = running.swap_remove(i);
        room.free += v.exclusive;
        room.evictable += v.cache_shared;
        plan.preempt.push(v.id);
    }
    true
}

pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
