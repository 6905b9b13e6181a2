//! The scheduler on the default model: continuous batching, prefix reuse, preemption,
//! cancellation, back-pressure, priorities, deadlines, and the determinism they must keep.
//! Needs `scripts/fetch-default-model`.

use std::time::Duration;

use forgeline_engine::chat::ChatMessage;
use forgeline_engine::sampling::SamplingParams;
use forgeline_engine::scheduler::{
    Event, GenerateRequest, LlmClient, ModelSchedulerConfig, Priority, Prompt, SchedulerConfig,
};
use forgeline_engine::stop::StopReason;
use forgeline_engine::Error;

mod default_support;
use default_support::load_default_model;

fn client(cfg: SchedulerConfig) -> LlmClient {
    LlmClient::start(vec![load_default_model("smollm2")], cfg).unwrap()
}

/// KV budget of `tokens` positions of the default model.
fn budget(tokens: usize) -> Option<usize> {
    Some(
        tokens
            * 30
            * 2
            * 3
            * 64
            * forgeline_engine::kv_cache::KvCache::DEFAULT_DTYPE.size_in_bytes(),
    )
}

/// Stats once the engine has published its state after the last step (events reach callers
/// within a step, the snapshot right after it).
async fn idle_stats(c: &LlmClient) -> forgeline_engine::scheduler::Stats {
    for _ in 0..250 {
        let st = c.stats();
        if st.running == 0 && st.waiting == 0 {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the engine did not go idle: {:?}", c.stats());
}

fn ask(q: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::chat(vec![ChatMessage::user(q)], max_tokens)
}

const QUESTIONS: [&str; 16] = [
    "Write a Python function that adds two numbers.",
    "What is a list comprehension?",
    "Reverse a string in Python.",
    "Explain recursion briefly.",
    "How do I read a file line by line?",
    "What does `yield` do?",
    "Sort a list of tuples by the second item.",
    "What is a Python decorator?",
    "Count words in a sentence.",
    "What is the GIL?",
    "Merge two dictionaries.",
    "Check whether a number is prime.",
    "What is a lambda?",
    "Flatten a nested list.",
    "What are *args and **kwargs?",
    "Remove duplicates from a list keeping order.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_is_the_same_alone_and_batched_with_15_others() {
    let c = client(SchedulerConfig {
        // Small steps: prompts are prefilled in chunks while others decode.
        per_model: ModelSchedulerConfig {
            step_tokens: 48,
            ..Default::default()
        },
        kv_budget_bytes: budget(8192),
        ..Default::default()
    });
    let mut alone = Vec::new();
    for q in QUESTIONS {
        alone.push(c.complete(ask(q, 12)).await.unwrap().tokens);
    }
    let streams: Vec<_> = QUESTIONS
        .iter()
        .map(|q| c.generate(ask(q, 12)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let out = s.collect().await.unwrap();
        assert_eq!(out.tokens, alone[i], "question {i} differs when batched");
    }
    let st = idle_stats(&c).await;
    assert!(
        st.models[0].batch_histogram[3..].iter().sum::<u64>() > 0,
        "never ran 8+ together: {st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_are_served_from_cache_with_identical_output() {
    let system = "You are a careful Python assistant. Answer with one short code block. ".repeat(6);
    let req = |q: &str| {
        GenerateRequest::chat(
            vec![ChatMessage::system(system.clone()), ChatMessage::user(q)],
            12,
        )
    };
    let cold = client(SchedulerConfig {
        per_model: ModelSchedulerConfig {
            prefix_cache: false,
            ..Default::default()
        },
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let mut want = Vec::new();
    for q in &QUESTIONS[..6] {
        want.push(cold.complete(req(q)).await.unwrap().tokens);
    }
    assert_eq!(idle_stats(&cold).await.models[0].cached_prompt_tokens, 0);

    let warm = client(SchedulerConfig {
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let streams: Vec<_> = QUESTIONS[..6]
        .iter()
        .map(|q| warm.generate(req(q)).unwrap())
        .collect();
    let mut cached = 0;
    for (i, s) in streams.into_iter().enumerate() {
        let out = s.collect().await.unwrap();
        assert_eq!(
            out.tokens, want[i],
            "request {i}: output differs with prefix reuse"
        );
        cached += out.usage.cached_prompt_tokens;
    }
    let st = idle_stats(&warm).await;
    assert!(
        cached > 0 && st.prefix_hit_rate() > 0.5,
        "hit rate {}: {st:?}",
        st.prefix_hit_rate()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_kv_budget_preempts_and_recomputes_without_losing_requests() {
    let roomy = client(SchedulerConfig {
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let mut want = Vec::new();
    for q in &QUESTIONS[..6] {
        want.push(roomy.complete(ask(q, 32)).await.unwrap().tokens);
    }
    // Room for about three of the six sequences at their full length.
    let tight = client(SchedulerConfig {
        per_model: ModelSchedulerConfig {
            prefix_cache: false,
            ..Default::default()
        },
        kv_budget_bytes: budget(256),
        ..Default::default()
    });
    let streams: Vec<_> = QUESTIONS[..6]
        .iter()
        .map(|q| tight.generate(ask(q, 32)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(s.collect().await.unwrap().tokens, want[i], "request {i}");
    }
    let st = idle_stats(&tight).await;
    assert!(st.models[0].preemptions > 0, "expected preemptions: {st:?}");
    assert_eq!(st.models[0].kv_used_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_and_frees_kv() {
    let c = client(SchedulerConfig {
        per_model: ModelSchedulerConfig {
            prefix_cache: false,
            ..Default::default()
        },
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let mut keep = c.generate(ask(QUESTIONS[0], 30)).unwrap();
    let mut dropped = c.generate(ask(QUESTIONS[1], 400)).unwrap();
    // Wait until the doomed one is producing, then walk away.
    let first = dropped.next().await.unwrap().unwrap();
    assert!(matches!(first, Event::Delta { .. }), "{first:?}");
    drop(dropped);
    let mut done = false;
    while let Some(ev) = keep.next().await {
        if let Event::Done { stop_reason, .. } = ev.unwrap() {
            assert_eq!(stop_reason, StopReason::MaxTokens);
            done = true;
        }
    }
    assert!(done);
    // The engine notices the closed stream at its next step.
    for _ in 0..200 {
        let st = c.stats();
        if st.running == 0 && st.models[0].kv_used_bytes == 0 {
            assert_eq!(st.models[0].cancelled, 1);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cancelled request still holds KV: {:?}", c.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_fails_at_once_with_overloaded() {
    let c = client(SchedulerConfig {
        per_model: ModelSchedulerConfig {
            max_running: 1,
            ..Default::default()
        },
        max_waiting: 2,
        kv_budget_bytes: budget(2048),
        ..Default::default()
    });
    let mut held = Vec::new();
    let mut overloaded = None;
    for q in &QUESTIONS[..8] {
        match c.generate(ask(q, 50)) {
            Ok(s) => held.push(s),
            Err(e) => {
                overloaded = Some(e);
                break;
            }
        }
    }
    match overloaded {
        Some(Error::Overloaded { limit, .. }) => assert_eq!(limit, 2),
        other => panic!("expected Overloaded, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_work_overtakes_a_queue_of_normal_work() {
    let c = client(SchedulerConfig {
        per_model: ModelSchedulerConfig {
            max_running: 2,
            ..Default::default()
        },
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let normal: Vec<_> = QUESTIONS[..8]
        .iter()
        .map(|q| c.generate(ask(q, 16)).unwrap())
        .collect();
    let mut urgent = ask("Say yes.", 4);
    urgent.priority = Priority::Critical;
    let urgent = c.complete(urgent).await.unwrap();
    // The urgent request waited for at most the two running ones, not for all eight.
    let mut finished_before = 0;
    for s in normal {
        let out = s.collect().await.unwrap();
        if out.usage.queue_time < urgent.usage.queue_time {
            finished_before += 1;
        }
    }
    assert!(
        finished_before <= 4,
        "{finished_before} normal requests were admitted first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_requests_with_what_they_have() {
    let c = client(SchedulerConfig {
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let mut r = ask(QUESTIONS[3], 2000);
    r.ignore_eos = true;
    r.deadline = Some(Duration::from_millis(300));
    let out = c.complete(r).await.unwrap();
    assert_eq!(out.stop_reason, StopReason::Deadline);
    assert!(out.tokens.len() < 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_by_name_and_models_are_chosen_by_name() {
    let c = LlmClient::start(
        vec![load_default_model("small"), load_default_model("coder")],
        SchedulerConfig {
            kv_budget_bytes: budget(1024),
            ..Default::default()
        },
    )
    .unwrap();
    let mut r = ask("hi", 4);
    r.model = Some("nope".into());
    let e = c.generate(r).err().unwrap().to_string();
    assert!(e.contains("nope") && e.contains("small, coder"), "{e}");
    let e = c.generate(ask("hi", 9000)).err().unwrap().to_string();
    assert!(e.contains("max_tokens"), "{e}");
    let mut r = ask("hi", 4);
    r.sampling = SamplingParams {
        top_p: 0.0,
        ..Default::default()
    };
    assert!(c.generate(r).err().unwrap().to_string().contains("top_p"));
    let e = c
        .generate(GenerateRequest::new(Prompt::Tokens(vec![]), 4))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("empty"), "{e}");

    let mut r = ask("Say hi.", 8);
    r.model = Some("coder".into());
    let out = c.complete(r).await.unwrap();
    assert!(!out.tokens.is_empty());
    let st = idle_stats(&c).await;
    assert_eq!(st.models[1].model, "coder");
    assert!(st.models[1].completion_tokens > 0 && st.models[0].completion_tokens == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_streams_text_and_honours_stops_and_seeds() {
    let c = client(SchedulerConfig {
        kv_budget_bytes: budget(4096),
        ..Default::default()
    });
    let base = ask("Write a haiku about the sea.", 12);
    let mut streamed = String::new();
    let mut s = c.generate(base.clone()).unwrap();
    let mut done = None;
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            Event::Delta { text, .. } => streamed.push_str(&text),
            Event::Done { stop_reason, usage } => done = Some((stop_reason, usage)),
        }
    }
    let (reason, usage) = done.unwrap();
    assert_eq!(reason, StopReason::MaxTokens);
    assert_eq!(usage.completion_tokens, 12);
    assert!(!streamed.is_empty());

    let word = streamed.split_whitespace().nth(1).unwrap().to_string();
    let mut r = base.clone();
    r.stop_strings = vec![word.clone()];
    let cut = c.complete(r).await.unwrap();
    assert_eq!(cut.stop_reason, StopReason::StopString);
    assert_eq!(cut.text, streamed[..streamed.find(&word).unwrap()]);

    let sampled = |seed| {
        let mut r = base.clone();
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..Default::default()
        };
        r.max_tokens = 16;
        c.complete(r)
    };
    let (a, b, d) = (
        sampled(1).await.unwrap(),
        sampled(1).await.unwrap(),
        sampled(2).await.unwrap(),
    );
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, d.tokens);

    let eos = c.complete(ask("Say hi.", 200)).await.unwrap();
    assert_eq!(eos.stop_reason, StopReason::Eos);
}

/// Each token's log-probability, as the request reports it while decoding, equals the one the
/// model gives that token after a prefill of the prompt and the tokens before it (another
/// path through the model: no decode step, no KV reuse): their sum is the sequence's
/// log-probability under the model. The alternatives are the most likely, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_sum_to_the_sequences_probability_under_the_model() {
    let c = client(SchedulerConfig::default());
    let prompt = c.tokenize(&ask("Name three colors.", 1)).unwrap();
    let mut req = GenerateRequest::new(Prompt::Tokens(prompt.clone()), 10);
    req.logprobs = Some(5);
    req.ignore_eos = true;
    let done = c.generate(req).unwrap().collect().await.unwrap();
    assert_eq!(done.logprobs.len(), done.tokens.len());
    assert_eq!(done.tokens.len(), 10);
    let mut total = 0.0f64;
    let mut rescored = 0.0f64;
    for (k, lp) in done.logprobs.iter().enumerate() {
        assert_eq!(lp.token, done.tokens[k]);
        assert!(lp.logprob <= 0.0 && lp.logprob.is_finite(), "{lp:?}");
        assert_eq!(lp.top.len(), 5);
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0].token, lp.token);
        assert!(
            lp.top
                .iter()
                .map(|t| f64::from(t.logprob).exp())
                .sum::<f64>()
                <= 1.0 + 1e-4
        );
        assert!(!lp.bytes.is_empty());
        total += f64::from(lp.logprob);

        // The same position, scored by a fresh request on a cold prefix cache path.
        let mut ids = prompt.clone();
        ids.extend(&done.tokens[..k]);
        let mut one = GenerateRequest::new(Prompt::Tokens(ids), 1);
        one.logprobs = Some(0);
        one.ignore_eos = true;
        let r = c.generate(one).unwrap().collect().await.unwrap();
        assert_eq!(r.tokens, [done.tokens[k]], "position {k}");
        assert!(r.logprobs[0].top.is_empty());
        rescored += f64::from(r.logprobs[0].logprob);
    }
    assert!(
        (total - rescored).abs() < 0.05 + 0.01 * total.abs(),
        "decoded {total}, rescored {rescored}"
    );
    assert!(total < 0.0);

    // Without the option, no log-probabilities are computed or sent.
    let plain = c.generate(ask("Hi", 4)).unwrap().collect().await.unwrap();
    assert!(plain.logprobs.is_empty());
    let mut too_many = ask("Hi", 4);
    too_many.logprobs = Some(21);
    let Err(e) = c.generate(too_many) else {
        panic!("21 alternatives were accepted")
    };
    let e = e.to_string();
    assert!(e.contains("top_logprobs") && e.contains("20"), "{e}");
}
