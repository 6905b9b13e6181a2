//! The scheduler's step around a runner we control: a word-level tokenizer, a tiny KV cache,
//! and a runner that always picks one token, or fails, or drops a caller mid-forward.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::*;
use crate::model::{Arch, ModelConfig};
use crate::scheduler::request::{GenerateRequest, ModelLimits, Prompt, ValidRequest};
use crate::scheduler::sequence::Event;

const VOCAB: usize = 16;
const BS: usize = 4;
const BLOCKS: usize = 16;

type Events = UnboundedReceiver<Result<Event>>;

/// Picks token 5 for every sequence; fails while `fail` is set; drops `drop_mid_step` (a
/// caller's stream) inside the forward pass.
struct Runner {
    fail: Arc<AtomicBool>,
    drop_mid_step: Arc<Mutex<Option<Events>>>,
}

impl ModelRunner for Runner {
    fn forward(&mut self, inputs: &[SeqInput], _kv: &KvCache) -> Result<Vec<Vec<f32>>> {
        drop(self.drop_mid_step.lock().unwrap().take());
        if self.fail.load(Ordering::SeqCst) {
            return Err(candle_core::Error::Msg("injected failure".into()).into());
        }
        let row = (0..VOCAB).map(|t| if t == 5 { 1.0 } else { 0.0 }).collect();
        Ok(vec![row; inputs.iter().filter(|i| i.logits).count()])
    }
}

fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    let vocab: Vec<String> = (0..VOCAB).map(|i| format!("\"w{i}\": {i}")).collect();
    let json = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        vocab.join(", ")
    );
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

struct Harness {
    sched: ModelScheduler,
    fail: Arc<AtomicBool>,
    drop_mid_step: Arc<Mutex<Option<Events>>>,
    next_id: u64,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        vocab_size: VOCAB,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.,
        rope_scaling: None,
        context_length: 64,
        tie_word_embeddings: true,
        gemma: None,
    };
    let kv = KvCache::new(&cfg, BS, BLOCKS, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let drop_mid_step = Arc::new(Mutex::new(None));
    let runner = Runner {
        fail: fail.clone(),
        drop_mid_step: drop_mid_step.clone(),
    };
    let sched = ModelScheduler::with_runner(
        "tiny".into(),
        Box::new(runner),
        tokenizer(dir.path()),
        cfg.context_length,
        kv,
        ModelSchedulerConfig::default(),
    );
    Harness {
        sched,
        fail,
        drop_mid_step,
        next_id: 0,
        _dir: dir,
    }
}

impl Harness {
    fn submit(&mut self, prompt: Vec<u32>, max_tokens: usize) -> Events {
        let limits = ModelLimits {
            name: "tiny".into(),
            context_length: 64,
            vocab_size: VOCAB,
        };
        let req = GenerateRequest::new(Prompt::Tokens(prompt.clone()), max_tokens);
        let valid = ValidRequest::new(&req, 0, &limits, prompt).unwrap();
        let (tx, rx) = unbounded_channel();
        self.next_id += 1;
        self.sched
            .submit(Seq::new(self.next_id, valid, tx).unwrap());
        rx
    }

    fn run_to_idle(&mut self) {
        for _ in 0..100 {
            if !self.sched.step() {
                return;
            }
        }
        panic!("the scheduler did not go idle");
    }

    /// Every block is free or held by the prefix cache alone: nothing leaked.
    fn assert_no_blocks_held(&self) {
        let s = &self.sched;
        assert_eq!(s.kv.free_blocks() + s.cache.cached_blocks(), BLOCKS);
    }
}

fn events(rx: &mut Events) -> Vec<Result<Event>> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[test]
fn requests_run_to_their_token_limit_through_the_runner() {
    let mut h = harness();
    let mut rx = h.submit(vec![1, 2, 3, 4, 6, 7], 3);
    h.run_to_idle();
    let evs = events(&mut rx);
    let tokens: Vec<u32> = evs
        .iter()
        .filter_map(|e| match e {
            Ok(Event::Delta { tokens, .. }) => Some(tokens.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(tokens, vec![5, 5, 5]);
    assert!(matches!(
        evs.last(),
        Some(Ok(Event::Done {
            stop_reason: StopReason::MaxTokens,
            ..
        }))
    ));
    assert_eq!(h.sched.stats.finished, 1);
    h.assert_no_blocks_held();
}

#[test]
fn a_failed_forward_fails_every_request_of_the_step_and_frees_their_blocks() {
    let mut h = harness();
    let mut a = h.submit(vec![1, 2, 3, 4, 6, 7], 4);
    let mut b = h.submit(vec![8, 9, 10], 4);
    // One good step first, so that the failure comes mid-generation.
    assert!(h.sched.step());
    h.fail.store(true, Ordering::SeqCst);
    assert!(h.sched.step());
    assert!(h.sched.is_idle(), "both left the scheduler");
    for rx in [&mut a, &mut b] {
        let evs = events(rx);
        // The first step's token, then the error, and nothing after it.
        assert!(matches!(evs[0], Ok(Event::Delta { .. })), "{evs:?}");
        assert!(
            matches!(evs[1..], [Err(Error::Internal(Internal::ForwardPass(_)))]),
            "{evs:?}"
        );
    }
    h.assert_no_blocks_held();
    // The engine goes on.
    h.fail.store(false, Ordering::SeqCst);
    let mut c = h.submit(vec![1, 2, 3], 2);
    h.run_to_idle();
    assert!(matches!(
        events(&mut c).last(),
        Some(Ok(Event::Done { .. }))
    ));
}

#[test]
fn a_caller_gone_during_the_forward_pass_is_reaped_at_the_next_step() {
    let mut h = harness();
    let a = h.submit(vec![1, 2, 3, 4, 6, 7], 8);
    let mut b = h.submit(vec![8, 9, 10], 3);
    *h.drop_mid_step.lock().unwrap() = Some(a);
    assert!(h.sched.step());
    assert_eq!(h.sched.running.len(), 2, "the step itself completes");
    assert!(h.sched.step());
    assert_eq!(h.sched.stats.cancelled, 1);
    assert_eq!(h.sched.running.len(), 1);
    h.run_to_idle();
    assert!(matches!(
        events(&mut b).last(),
        Some(Ok(Event::Done { .. }))
    ));
    h.assert_no_blocks_held();
}
