//! The policy on constructed states: no model, no KV tensors, no clock but `base()`.

use std::sync::OnceLock;

use super::*;

const BS: usize = 4;

/// A fixed instant, so that ages are exact.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn at(secs: f64) -> Instant {
    base() + Duration::from_secs_f64(secs)
}

fn cfg(step_tokens: usize, max_running: usize) -> ModelSchedulerConfig {
    ModelSchedulerConfig {
        step_tokens,
        max_running,
        prefix_cache: true,
    }
}

fn kv(num_blocks: usize, free: usize, evictable: usize) -> KvState {
    KvState {
        block_size: BS,
        num_blocks,
        free,
        evictable,
    }
}

/// `len` tokens unique to `id`.
fn toks(id: u64, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| id as u32 * 1000 + i).collect()
}

fn waiting(id: u64, tokens: &[u32], priority: Priority, submitted: Instant) -> WaitingSeq<'_> {
    WaitingSeq {
        id,
        priority,
        submitted,
        tokens,
        cached: Vec::new(),
        cached_evictable: Vec::new(),
        gone: None,
    }
}

/// A running sequence holding, alone, the blocks of its `computed` positions.
fn running(id: u64, tokens: &[u32], computed: usize, priority: Priority) -> RunningSeq<'_> {
    let blocks = computed.div_ceil(BS);
    RunningSeq {
        id,
        priority,
        submitted: at(0.0),
        tokens,
        computed,
        blocks,
        exclusive_blocks: blocks,
        cache_shared_blocks: 0,
        gone: None,
    }
}

fn state<'a>(
    now: Instant,
    waiting: Vec<WaitingSeq<'a>>,
    running: Vec<RunningSeq<'a>>,
    kv: KvState,
) -> SchedState<'a> {
    SchedState {
        now,
        waiting,
        running,
        kv,
    }
}

fn run(plan: &StepPlan) -> Vec<(u64, usize)> {
    plan.run.iter().map(|r| (r.id, r.tokens)).collect()
}

fn admitted(plan: &StepPlan) -> Vec<u64> {
    plan.admit.iter().map(|a| a.id).collect()
}

#[test]
fn decodes_run_first_and_prompts_are_chunked_into_the_rest_of_the_budget() {
    let (a, b, c, d) = (toks(1, 9), toks(2, 5), toks(3, 40), toks(4, 30));
    let st = state(
        at(0.0),
        vec![],
        vec![
            // A prompt listed first still comes after the decodes.
            running(3, &c, 0, Priority::Critical),
            running(1, &a, 8, Priority::Normal),
            running(2, &b, 4, Priority::Low),
            running(4, &d, 0, Priority::Low),
        ],
        kv(64, 64, 0),
    );
    let plan = schedule(&st, &cfg(16, 8));
    assert_eq!(run(&plan), vec![(1, 1), (2, 1), (3, 14)]);
    assert!(plan.preempt.is_empty() && plan.fail.is_empty());

    // The next step continues the chunk where it stopped; the budget then reaches the next
    // prompt.
    let st = state(
        at(0.0),
        vec![],
        vec![
            running(3, &c, 14, Priority::Critical),
            running(4, &d, 0, Priority::Low),
        ],
        kv(64, 64, 0),
    );
    assert_eq!(run(&schedule(&st, &cfg(30, 8))), vec![(3, 26), (4, 4)]);
}

#[test]
fn priorities_order_admission_and_waiting_ages_a_request_up() {
    let (n, l, c) = (toks(1, 8), toks(2, 8), toks(3, 8));
    // At t=100: a normal and a critical request just submitted, a low one submitted at `low`.
    let plan = |low: f64, max_running: usize| {
        let st = state(
            at(100.0),
            vec![
                waiting(1, &n, Priority::Normal, at(100.0)),
                waiting(2, &l, Priority::Low, at(low)),
                waiting(3, &c, Priority::Critical, at(100.0)),
            ],
            vec![],
            kv(64, 64, 0),
        );
        admitted(&schedule(&st, &cfg(512, max_running)))
    };
    let ageing = AGEING.as_secs_f64();
    assert_eq!(plan(100.0, 3), vec![3, 1, 2], "fresh: by class");
    assert_eq!(plan(100.0, 1), vec![3], "only the most urgent fits");
    // Three periods lift the low request (rank 3) to a critical one's rank; older, it goes
    // first.
    assert_eq!(plan(100.0 - 3.0 * ageing, 3), vec![2, 3, 1]);
    // Two and a half: rank 1, between the critical and the normal one.
    assert_eq!(plan(100.0 - 2.5 * ageing, 3), vec![3, 2, 1]);
}

#[test]
fn a_full_kv_cache_evicts_cached_blocks_before_preempting_the_least_urgent() {
    // Each decode needs the next block only for sequence 1.
    let (a, b, c) = (toks(1, 9), toks(2, 6), toks(3, 6));
    let three = || {
        vec![
            running(1, &a, 8, Priority::Critical),
            running(2, &b, 5, Priority::Normal),
            running(3, &c, 5, Priority::Low),
        ]
    };
    let plan = schedule(&state(at(0.0), vec![], three(), kv(6, 0, 0)), &cfg(64, 8));
    assert_eq!(
        plan.preempt,
        vec![3],
        "the low request goes, not the normal one"
    );
    assert_eq!(run(&plan), vec![(1, 1), (2, 1)]);

    // With an evictable cached block, nobody is preempted.
    let plan = schedule(&state(at(0.0), vec![], three(), kv(7, 0, 1)), &cfg(64, 8));
    assert!(plan.preempt.is_empty());
    assert_eq!((plan.evict, run(&plan).len()), (1, 3));

    // A victim whose blocks the prefix cache shares frees them by eviction.
    let mut rs = three();
    rs[2].exclusive_blocks = 0;
    rs[2].cache_shared_blocks = 2;
    let plan = schedule(&state(at(0.0), vec![], rs, kv(6, 0, 0)), &cfg(64, 8));
    assert_eq!((plan.preempt.clone(), plan.evict), (vec![3], 1));

    // Needing three blocks: the low request, then the normal one.
    let big = toks(1, 17);
    let rs = vec![
        running(1, &big, 8, Priority::Critical),
        running(2, &b, 5, Priority::Normal),
        running(3, &c, 5, Priority::Low),
    ];
    let plan = schedule(&state(at(0.0), vec![], rs, kv(6, 0, 0)), &cfg(64, 8));
    assert_eq!(plan.preempt, vec![3, 2]);
    assert_eq!(run(&plan), vec![(1, 9)]);

    // Alone and still too big: it fails rather than waiting forever.
    let rs = vec![running(1, &big, 8, Priority::Critical)];
    let plan = schedule(&state(at(0.0), vec![], rs, kv(2, 0, 0)), &cfg(64, 8));
    assert_eq!(plan.fail, vec![(1, NoRoom::Sequence { tokens: 17 })]);
    assert!(plan.run.is_empty());
}

#[test]
fn admission_needs_room_for_the_whole_prompt_and_a_prompt_too_big_fails() {
    let (p, q) = (toks(1, 15), toks(2, 40));
    // 15 tokens and the first answer token: 4 blocks.
    let st = |free| {
        state(
            at(0.0),
            vec![waiting(1, &p, Priority::Normal, at(0.0))],
            vec![],
            kv(8, free, 0),
        )
    };
    assert_eq!(admitted(&schedule(&st(4), &cfg(512, 8))), vec![1]);
    assert!(schedule(&st(3), &cfg(512, 8)).admit.is_empty());
    // More blocks than the cache has, with nothing running to wait for.
    let st = state(
        at(0.0),
        vec![waiting(2, &q, Priority::Normal, at(0.0))],
        vec![],
        kv(8, 8, 0),
    );
    assert_eq!(
        schedule(&st, &cfg(512, 8)).fail,
        vec![(2, NoRoom::Prompt { blocks: 11 })]
    );
}

#[test]
fn a_cached_prefix_is_adopted_and_is_not_counted_as_room() {
    let p = toks(1, 15);
    let mut w = waiting(1, &p, Priority::Normal, at(0.0));
    w.cached = vec![7, 8, 9];
    w.cached_evictable = vec![7, 8, 9];
    // Needs 4 - 3 = 1 new block; the cache's only evictable blocks are its own prefix.
    let st = state(at(0.0), vec![w.clone()], vec![], kv(8, 0, 3));
    assert!(schedule(&st, &cfg(512, 8)).admit.is_empty());
    let st = state(at(0.0), vec![w], vec![], kv(8, 1, 3));
    let plan = schedule(&st, &cfg(512, 8));
    assert_eq!(
        plan.admit,
        vec![Admission {
            id: 1,
            cached: vec![7, 8, 9]
        }]
    );
    assert_eq!(
        run(&plan),
        vec![(1, 3)],
        "only the uncached tail is computed"
    );
}

#[test]
fn a_request_waits_for_a_prefix_another_is_computing() {
    let shared = toks(9, 16);
    let r = [shared.clone(), toks(1, 8)].concat();
    let w = [shared.clone(), toks(2, 8)].concat();
    let other = toks(3, 8);
    let room = kv(64, 64, 0);
    // r is computing its prompt: w would compute the same 4 blocks again.
    let st = state(
        at(0.0),
        vec![
            waiting(2, &w, Priority::Normal, at(0.0)),
            waiting(3, &other, Priority::Normal, at(1.0)),
        ],
        vec![running(1, &r, 8, Priority::Normal)],
        room.clone(),
    );
    let plan = schedule(&st, &cfg(512, 8));
    assert_eq!(plan.wait_for_prefix, vec![2]);
    assert_eq!(
        admitted(&plan),
        vec![3],
        "an unrelated request is not held back"
    );

    // Two new requests sharing a prefix: the second waits for the first.
    let st = state(
        at(0.0),
        vec![
            waiting(1, &r, Priority::Normal, at(0.0)),
            waiting(2, &w, Priority::Normal, at(1.0)),
        ],
        vec![],
        room.clone(),
    );
    let plan = schedule(&st, &cfg(512, 8));
    assert_eq!((admitted(&plan), plan.wait_for_prefix), (vec![1], vec![2]));

    // Once the prefix is cached, it is adopted.
    let mut cached = waiting(2, &w, Priority::Normal, at(0.0));
    cached.cached = vec![10, 11, 12, 13];
    let st = state(
        at(0.0),
        vec![cached],
        vec![running(1, &r, 20, Priority::Normal)],
        room.clone(),
    );
    let plan = schedule(&st, &cfg(512, 8));
    assert!(plan.wait_for_prefix.is_empty());
    assert_eq!(plan.admit[0].cached, vec![10, 11, 12, 13]);

    // Without a prefix cache there is nothing to wait for.
    let st = state(
        at(0.0),
        vec![waiting(2, &w, Priority::Normal, at(0.0))],
        vec![running(1, &r, 8, Priority::Normal)],
        room,
    );
    let no_cache = ModelSchedulerConfig {
        prefix_cache: false,
        ..cfg(512, 8)
    };
    assert_eq!(admitted(&schedule(&st, &no_cache)), vec![2]);
}

#[test]
fn a_request_cancelled_mid_step_is_reaped_and_its_room_reused_at_once() {
    let (a, b, w) = (toks(1, 9), toks(2, 9), toks(3, 15));
    // b holds one block alone and one with the prefix cache; w needs 4 blocks.
    let mut cancelled = running(2, &b, 8, Priority::Critical);
    cancelled.exclusive_blocks = 1;
    cancelled.cache_shared_blocks = 1;
    let mut late = waiting(4, &a, Priority::Critical, at(0.0));
    late.gone = Some(Gone::Deadline);
    let st = |gone: Option<Gone>| {
        let mut b = cancelled.clone();
        b.gone = gone;
        state(
            at(0.0),
            vec![waiting(3, &w, Priority::Low, at(0.0)), late.clone()],
            vec![running(1, &a, 8, Priority::Normal), b],
            kv(8, 3, 0),
        )
    };
    let plan = schedule(&st(Some(Gone::Abandoned)), &cfg(512, 8));
    assert_eq!(plan.reap, vec![(2, Gone::Abandoned), (4, Gone::Deadline)]);
    assert!(
        plan.run.iter().all(|r| r.id != 2),
        "a cancelled request never runs"
    );
    assert_eq!(admitted(&plan), vec![3], "its blocks admit w");
    assert_eq!(run(&plan), vec![(1, 1), (3, 15)]);
    assert_eq!(plan.evict, 1, "its block shared with the cache, evicted");
    assert!(plan.preempt.is_empty());
    // Not cancelled: no room for w, and b keeps running.
    let plan = schedule(&st(None), &cfg(512, 8));
    assert!(plan.admit.is_empty());
    assert_eq!(run(&plan), vec![(2, 1), (1, 1)]);
}
