//! Continuous batching of every LLM call over shared model instances.
//!
//! The engine runs on its own thread. `LlmClient` (cloneable, `Send + Sync`, async) validates
//! each request at the boundary, tokenizes it (and compiles its constraint) on the caller's
//! side, and sends it to that thread, which admits and retires sequences between forward
//! passes under a token budget, reuses cached KV of shared prompt prefixes, and preempts (to
//! recompute later) when the KV budget runs out. Each request streams its own events back;
//! dropping the stream cancels it.
//!
//! # Layout
//! - `request`: `GenerateRequest`, `Prompt`, `Priority`, and validation into `ValidRequest`.
//! - `sequence`: one request in flight: tokens, blocks, sampler, detokenizer, events.
//! - `model_scheduler`: one model's scheduler: a step snapshots its requests and KV cache,
//!   asks `policy` for a plan, enacts it, runs the forward pass, and applies the outputs.
//! - `policy`: the pure scheduling policy, `schedule(&SchedState) -> StepPlan`: admission
//!   (priorities with ageing, prefix reuse, waiting for an in-flight prefix), chunked
//!   prefill under the token budget, preemption under the KV budget.
//! - `runner`: `ModelRunner`, the forward pass the scheduler calls.
//! - `prefix_cache`: the radix tree of cached KV blocks.
//! - `stats`: the `stats()` snapshot.
//! - this file: the engine thread and `LlmClient`.

mod model_scheduler;
mod policy;
mod prefix_cache;
mod request;
mod runner;
mod sequence;
mod stats;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use policy::{ModelSchedulerConfig, AGEING};
pub use prefix_cache::PrefixCache;
pub use request::{GenerateRequest, ModelLimits, Priority, Prompt, ValidRequest, MAX_TOP_LOGPROBS};
pub use sequence::{Event, TokenLogprob, TopLogprob, Usage};
pub use stats::{ModelSchedulerStats, Stats, BATCH_BUCKETS};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::constraint::{Constraint, ConstraintState, Constraints};
use crate::error::{ConfigError, Internal, Validation};
use crate::kv_cache::KvCache;
use crate::loader::LoadedModel;
use crate::registry::Recipe;
use crate::stop::StopReason;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::DType;
use model_scheduler::ModelScheduler;
use sequence::Seq;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// The policy's knobs, the same for each model's scheduler.
    pub per_model: ModelSchedulerConfig,
    /// Requests waiting for admission, beyond which `generate` fails with `Overloaded`.
    pub max_waiting: usize,
    /// KV cache bytes per model; None derives it from available memory and the model.
    pub kv_budget_bytes: Option<usize>,
    /// What the KV cache stores K and V as (f16 or f32).
    pub kv_dtype: DType,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            per_model: ModelSchedulerConfig::default(),
            max_waiting: 256,
            kv_budget_bytes: None,
            kv_dtype: KvCache::DEFAULT_DTYPE,
        }
    }
}

/// The default KV budget: room for four full contexts, within a quarter of available memory,
/// and at least one full context.
pub fn default_kv_budget(m: &LoadedModel, models: usize, dtype: DType) -> usize {
    let per_token = KvCache::bytes_per_token(m.model.config(), dtype);
    let ctx = m.model.config().context_length;
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30);
    (available / 4 / models.max(1))
        .min(per_token * ctx * 4)
        .max(per_token * ctx)
}

/// What the client side knows of a model: enough to validate and tokenize a request.
struct ModelHandle {
    limits: ModelLimits,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Its manifest's recipe: a system prompt for chats without one, stop strings.
    recipe: Recipe,
    /// The model's constraint compiler, built on the first constrained request.
    constraints: Arc<Constraints>,
}

enum Command {
    Submit(Seq),
}

struct Shared {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    models: Vec<ModelHandle>,
    max_waiting: usize,
    /// Requests sent to the engine thread, and those it has taken from the channel.
    sent: AtomicUsize,
    received: Arc<AtomicUsize>,
    /// Requests in the engine's waiting lists that were never admitted.
    waiting: Arc<AtomicUsize>,
    stats: Arc<Mutex<Stats>>,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the channel ends the engine thread once its work is done.
        self.tx.lock().map(|mut t| t.take()).ok();
        if let Some(h) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = h.join();
        }
    }
}

/// The handle every stage uses to run LLM calls. Cheap to clone; all clones share the
/// engine thread, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct LlmClient {
    shared: Arc<Shared>,
}

/// The events of one request. Dropping it cancels the request.
pub struct ResponseStream {
    rx: UnboundedReceiver<Result<Event>>,
}

impl ResponseStream {
    pub async fn next(&mut self) -> Option<Result<Event>> {
        self.rx.recv().await
    }

    /// Blocking variant for synchronous callers (not from inside an async runtime).
    pub fn blocking_next(&mut self) -> Option<Result<Event>> {
        self.rx.blocking_recv()
    }

    /// Collects the whole answer.
    pub async fn collect(mut self) -> Result<Completion> {
        let mut c = Completion::default();
        while let Some(ev) = self.next().await {
            if c.absorb(ev?) {
                return Ok(c);
            }
        }
        Err(Internal::StreamEnded.into())
    }
}

/// A finished request, collected.
#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Per token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
    pub stop_reason: StopReason,
    pub usage: Usage,
}

impl Default for Completion {
    fn default() -> Self {
        Self {
            text: String::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            stop_reason: StopReason::MaxTokens,
            usage: Usage::default(),
        }
    }
}

impl Completion {
    /// Adds an event; true once the request is done.
    pub fn absorb(&mut self, ev: Event) -> bool {
        match ev {
            Event::Delta {
                text,
                tokens,
                logprobs,
            } => {
                self.text.push_str(&text);
                self.tokens.extend(tokens);
                self.logprobs.extend(logprobs);
                false
            }
            Event::Done { stop_reason, usage } => {
                self.stop_reason = stop_reason;
                self.usage = usage;
                true
            }
        }
    }
}

impl LlmClient {
    /// Starts the engine thread with these models; the first is the default.
    pub fn start(models: Vec<LoadedModel>, cfg: SchedulerConfig) -> Result<Self> {
        if models.is_empty() {
            return Err(ConfigError::NoModels.into());
        }
        let n = models.len();
        let mut schedulers = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for m in models {
            if handles
                .iter()
                .any(|h: &ModelHandle| h.limits.name == m.info.name)
            {
                return Err(ConfigError::DuplicateModel(m.info.name.clone()).into());
            }
            let budget = cfg
                .kv_budget_bytes
                .unwrap_or_else(|| default_kv_budget(&m, n, cfg.kv_dtype));
            let kv = KvCache::with_budget(
                m.model.config(),
                KvCache::DEFAULT_BLOCK_SIZE,
                budget,
                cfg.kv_dtype,
                m.model.device(),
            )?;
            handles.push(ModelHandle {
                limits: ModelLimits {
                    name: m.info.name.clone(),
                    context_length: m.model.config().context_length,
                    vocab_size: m.model.config().vocab_size,
                },
                tokenizer: m.tokenizer.clone(),
                template: m.chat_template.clone(),
                recipe: m.recipe.clone(),
                constraints: Arc::new(Constraints::new(
                    m.tokenizer.clone(),
                    m.model.config().vocab_size,
                )),
            });
            schedulers.push(ModelScheduler::new(m, kv, cfg.per_model.clone()));
        }
        let (tx, rx) = mpsc::channel();
        let received = Arc::new(AtomicUsize::new(0));
        let waiting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(Stats::default()));
        // The models and their KV budgets are known before the first request.
        publish(&schedulers, &stats);
        let thread = {
            let (received, waiting, stats) = (received.clone(), waiting.clone(), stats.clone());
            std::thread::Builder::new()
                .name("forgeline-engine".into())
                .spawn(move || engine_loop(schedulers, rx, &received, &waiting, &stats))
                .map_err(Internal::ThreadSpawn)?
        };
        Ok(Self {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                models: handles,
                max_waiting: cfg.max_waiting,
                sent: AtomicUsize::new(0),
                received,
                waiting,
                stats,
                next_id: AtomicU64::new(0),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Requests that may wait for admission before more are refused (`Overloaded`).
    pub fn max_waiting(&self) -> usize {
        self.shared.max_waiting
    }

    pub fn model_names(&self) -> Vec<String> {
        self.shared
            .models
            .iter()
            .map(|m| m.limits.name.clone())
            .collect()
    }

    fn model(&self, name: Option<&str>) -> Result<(usize, &ModelHandle)> {
        match name {
            None => Ok((0, &self.shared.models[0])),
            Some(n) => self
                .shared
                .models
                .iter()
                .enumerate()
                .find(|(_, m)| m.limits.name == n)
                .ok_or_else(|| {
                    Validation::UnknownModel {
                        name: n.to_string(),
                        loaded: self.model_names(),
                    }
                    .into()
                }),
        }
    }

    /// The context length of a model (None: the default model).
    pub fn context_length(&self, model: Option<&str>) -> Result<usize> {
        Ok(self.model(model)?.1.limits.context_length)
    }

    /// The recipe of a model (None: the default model), from its manifest.
    pub fn recipe(&self, model: Option<&str>) -> Result<&Recipe> {
        Ok(&self.model(model)?.1.recipe)
    }

    /// The tokens a request's prompt becomes on its model.
    pub fn tokenize(&self, req: &GenerateRequest) -> Result<Vec<u32>> {
        let (_, m) = self.model(req.model.as_deref())?;
        // A chat without a system message gets the recipe's.
        let with_system = |msgs: &[ChatMessage]| -> Vec<ChatMessage> {
            match &m.recipe.system_prompt {
                Some(p) if !msgs.iter().any(|x| x.role == "system") => {
                    std::iter::once(ChatMessage::system(p.clone()))
                        .chain(msgs.iter().cloned())
                        .collect()
                }
                _ => msgs.to_vec(),
            }
        };
        match &req.prompt {
            Prompt::Tokens(t) => Ok(t.clone()),
            Prompt::Text(s) => m.tokenizer.encode(s, m.tokenizer.add_bos_token()),
            Prompt::Chat(msgs) => m.tokenizer.encode(
                &m.template
                    .render_with_tools(&with_system(msgs), &req.tools, true)?,
                false,
            ),
            Prompt::Infill { prefix, suffix } => {
                let fim = m.tokenizer.fim_tokens().ok_or_else(|| {
                    Error::Validation(Validation::NoInfill {
                        model: m.limits.name.clone(),
                    })
                })?;
                let mut ids = Vec::new();
                if m.tokenizer.add_bos_token() {
                    ids.extend(m.tokenizer.bos_token_id());
                }
                ids.push(fim.prefix);
                ids.extend(m.tokenizer.encode(prefix, false)?);
                ids.push(fim.suffix);
                ids.extend(m.tokenizer.encode(suffix, false)?);
                ids.push(fim.middle);
                Ok(ids)
            }
            Prompt::ChatContinue {
                messages,
                assistant_prefix,
            } => {
                let mut text =
                    m.template
                        .render_with_tools(&with_system(messages), &req.tools, true)?;
                text.push_str(assistant_prefix);
                m.tokenizer.encode(&text, false)
            }
        }
    }

    /// Validates and queues a request; its events arrive on the returned stream. Fails at
    /// once with `Overloaded` when the waiting queue is full.
    pub fn generate(&self, req: GenerateRequest) -> Result<ResponseStream> {
        let (idx, m) = self.model(req.model.as_deref())?;
        let prompt = self.tokenize(&req)?;
        let mut valid = ValidRequest::new(&req, idx, &m.limits, prompt)?;
        for s in &m.recipe.stop {
            if !valid.stop_strings.contains(s) {
                valid.stop_strings.push(s.clone());
            }
        }
        if req.sampling.uses_dry() {
            // Built once per model, here on the caller's thread rather than in a decode step.
            m.tokenizer.dry_breakers();
        }
        let valid = match &req.constraint {
            Some(c) => valid.with_constraint(Some(m.constraints.compile(c)?)),
            None => valid,
        };
        let s = &self.shared;
        let queued = s.sent.load(Ordering::SeqCst) - s.received.load(Ordering::SeqCst)
            + s.waiting.load(Ordering::SeqCst);
        if queued >= s.max_waiting {
            return Err(Error::Overloaded {
                waiting: queued,
                limit: s.max_waiting,
            });
        }
        let (etx, erx) = unbounded_channel();
        let seq = Seq::new(s.next_id.fetch_add(1, Ordering::Relaxed), valid, etx)?;
        let tx = s.tx.lock().map_err(|_| Internal::LockPoisoned)?;
        let tx = tx.as_ref().ok_or(Internal::EngineStopped)?;
        s.sent.fetch_add(1, Ordering::SeqCst);
        tx.send(Command::Submit(seq))
            .map_err(|_| Internal::EngineThreadStopped)?;
        Ok(ResponseStream { rx: erx })
    }

    /// Compiles `c` for a model (None: the default) without running anything: checks a
    /// grammar, and builds the model's constraint compiler ahead of the first request.
    pub fn compile_constraint(
        &self,
        model: Option<&str>,
        c: &Constraint,
    ) -> Result<ConstraintState> {
        self.model(model)?.1.constraints.compile(c)
    }

    /// Runs a request to the end and returns its text.
    pub async fn complete(&self, req: GenerateRequest) -> Result<Completion> {
        self.generate(req)?.collect().await
    }

    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Whether the engine thread is running and takes requests (false once it has ended,
    /// by a panic or after `shut_down`).
    pub fn is_alive(&self) -> bool {
        let open = self.shared.tx.lock().is_ok_and(|t| t.is_some());
        let running =
            (self.shared.thread.lock()).is_ok_and(|t| t.as_ref().is_some_and(|h| !h.is_finished()));
        open && running
    }

    /// Stops taking requests: the engine thread finishes those it has and ends. Later
    /// requests fail; `is_alive` is false from now on.
    pub fn shut_down(&self) {
        self.shared.tx.lock().map(|mut t| t.take()).ok();
    }
}

fn engine_loop(
    mut schedulers: Vec<ModelScheduler>,
    rx: mpsc::Receiver<Command>,
    received: &AtomicUsize,
    waiting: &AtomicUsize,
    stats: &Mutex<Stats>,
) {
    let mut open = true;
    loop {
        let idle = schedulers.iter().all(|s| s.is_idle());
        if idle && !open {
            return;
        }
        // Block for work when idle; otherwise take whatever has arrived.
        let first = if idle {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => {
                    open = false;
                    None
                }
            }
        } else {
            None
        };
        for cmd in first
            .into_iter()
            .chain(std::iter::from_fn(|| match rx.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    None
                }
            }))
        {
            received.fetch_add(1, Ordering::SeqCst);
            match cmd {
                Command::Submit(seq) => {
                    let m = seq.req.model;
                    schedulers[m].submit(seq);
                }
            }
        }
        for sched in &mut schedulers {
            let _span = tracing::trace_span!("step", model = %sched.name()).entered();
            sched.step();
        }
        let never_admitted: usize = schedulers
            .iter()
            .map(|s| s.waiting.iter().filter(|q| !q.was_admitted()).count())
            .sum();
        waiting.store(never_admitted, Ordering::SeqCst);
        publish(&schedulers, stats);
    }
}

/// Makes the schedulers' figures what `LlmClient::stats` reads.
fn publish(schedulers: &[ModelScheduler], stats: &Mutex<Stats>) {
    if let Ok(mut st) = stats.lock() {
        st.waiting = schedulers.iter().map(|s| s.waiting.len()).sum();
        st.running = schedulers.iter().map(|s| s.running.len()).sum();
        st.models = schedulers
            .iter()
            .map(|s| {
                let mut m = s.stats.clone();
                m.waiting = s.waiting.len();
                m.running = s.running.len();
                m
            })
            .collect();
    }
}
