//! Constrained decoding on the default model: JSON-schema output that always parses and
//! validates, greedy or sampled; grammars that fail to compile are request errors; a
//! constrained request leaves the unconstrained ones batched with it untouched; the mask's
//! per-token cost against the forward pass. Needs `scripts/fetch-default-model`.

use std::time::Instant;

use forgeline_engine::chat::ChatMessage;
use forgeline_engine::constraint::Constraint;
use forgeline_engine::error::Validation;
use forgeline_engine::sampling::SamplingParams;
use forgeline_engine::scheduler::{Completion, GenerateRequest, LlmClient, SchedulerConfig};
use forgeline_engine::stop::StopReason;
use forgeline_engine::Error;
use serde_json::{json, Value};

mod default_support;
use default_support::load_default_model;

const ROUTES: [&str; 6] = [
    "function",
    "module",
    "script",
    "data_analysis",
    "fix",
    "explain",
];

fn client() -> LlmClient {
    let m = load_default_model("smollm2");
    LlmClient::start(vec![m], SchedulerConfig::default()).unwrap()
}

/// The router's schema. Its strings and numbers are unbounded: fine greedily, but sampling at
/// temperature 1.0 can wander inside a string until `max_tokens` cuts it (seen: a 600-character
/// `entry_point`), so see `bounded_router_schema`.
fn router_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "route": {"enum": ROUTES},
            "entry_point": {"type": "string"},
            "confidence": {"type": "number"}
        },
        "required": ["route", "entry_point"],
        "additionalProperties": false
    })
}

/// The same with lengths bounded, as a schema for sampled output should be: every path
/// through it ends within `max_tokens`.
fn bounded_router_schema() -> Value {
    let mut s = router_schema();
    s["properties"]["entry_point"]["maxLength"] = json!(40);
    s["properties"]["confidence"] = json!({"type": "number", "minimum": 0, "maximum": 1});
    s
}

const TASKS: [&str; 3] = [
    "Write a function `dedupe(rows)` that removes duplicate rows from a list, keeping order.",
    "My script crashes with KeyError: 'name' when a row has no name column. Fix it.",
    "Load sales.csv and plot the monthly revenue per region.",
];

fn route_request(task: &str, sampling: SamplingParams) -> GenerateRequest {
    let mut r = GenerateRequest::chat(
        vec![
            ChatMessage::system(
                "You route programming tasks. Reply with a JSON object: \"route\" is one of \
                 function, module, script, data_analysis, fix, explain; \"entry_point\" is the \
                 name of the main function or file; \"confidence\" is a number from 0 to 1.",
            ),
            ChatMessage::user(format!("Task: {task}")),
        ],
        160,
    );
    r.sampling = sampling;
    r.constraint = Some(Constraint::JsonSchema(router_schema()));
    r
}

/// The checks a caller of the router stage would make.
fn check_route(out: &Completion, what: &str) -> Value {
    let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {:?} (stop {:?})",
            out.text, out.stop_reason
        )
    });
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    let route = o["route"].as_str().unwrap_or_else(|| panic!("{what}: {v}"));
    assert!(ROUTES.contains(&route), "{what}: route {route:?}");
    assert!(o["entry_point"].is_string(), "{what}: {v}");
    if let Some(c) = o.get("confidence") {
        assert!(c.is_number(), "{what}: {v}");
    }
    assert!(
        o.keys()
            .all(|k| ["route", "entry_point", "confidence"].contains(&k.as_str())),
        "{what}: extra keys in {v}"
    );
    assert!(
        matches!(
            out.stop_reason,
            StopReason::ConstraintDone | StopReason::Eos
        ),
        "{what}: stopped by {:?}",
        out.stop_reason
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_schema_output_always_parses_and_validates() {
    let c = client();
    for task in TASKS {
        let out = c
            .complete(route_request(task, SamplingParams::greedy()))
            .await
            .unwrap();
        let v = check_route(&out, &format!("greedy, {task:?}"));
        eprintln!("greedy: {v}");
    }
    // Sampled at temperature 1.0, several seeds, all in flight together.
    let mut streams = Vec::new();
    for seed in 1..=8u64 {
        let task = TASKS[seed as usize % TASKS.len()];
        let sampling = SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        };
        let mut r = route_request(task, sampling);
        r.constraint = Some(Constraint::JsonSchema(bounded_router_schema()));
        streams.push((seed, c.generate(r).unwrap()));
    }
    for (seed, s) in streams {
        let out = s.collect().await.unwrap();
        let v = check_route(&out, &format!("temperature 1.0, seed {seed}"));
        assert!(
            v["entry_point"].as_str().unwrap().chars().count() <= 40,
            "{v}"
        );
        if let Some(x) = v["confidence"].as_f64() {
            assert!((0.0..=1.0).contains(&x), "{v}");
        }
        eprintln!("seed {seed}: {}", out.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_lark_and_any_json_constraints_hold() {
    let c = client();
    let ask = |q: &str, k: Constraint| {
        let mut r = GenerateRequest::chat(vec![ChatMessage::user(q)], 48);
        r.constraint = Some(k);
        r
    };
    let out = c
        .complete(ask(
            "Is 7 a prime number? Answer yes or no.",
            Constraint::Regex("(yes|no)".into()),
        ))
        .await
        .unwrap();
    assert!(out.text == "yes" || out.text == "no", "{:?}", out.text);
    assert_eq!(out.stop_reason, StopReason::ConstraintDone);

    let out = c
        .complete(ask(
            "Name a Python version.",
            Constraint::Lark(r#"start: "3." /[0-9]{1,2}/"#.into()),
        ))
        .await
        .unwrap();
    assert!(
        out.text.starts_with("3.") && out.text[2..].chars().all(|ch| ch.is_ascii_digit()),
        "{:?}",
        out.text
    );

    let out = c
        .complete(ask(
            "Describe a user with a name and an age, as JSON.",
            Constraint::Json,
        ))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(v.is_object(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammars_that_do_not_compile_are_errors_naming_the_problem() {
    let c = client();
    let err = |k: Constraint| -> String {
        let mut r = GenerateRequest::chat(vec![ChatMessage::user("hi")], 8);
        r.constraint = Some(k);
        match c.generate(r) {
            Err(e @ Error::Validation(Validation::Constraint { .. })) => {
                eprintln!("{e}");
                e.to_string()
            }
            Err(e) => panic!("not a constraint error: {e:?}"),
            Ok(_) => panic!("accepted"),
        }
    };
    let e = err(Constraint::JsonSchema(json!({
        "type": "object",
        "properties": {"route": {"type": "strnig"}}
    })));
    assert!(e.contains("JSON schema") && e.contains("strnig"), "{e}");
    let e = err(Constraint::JsonSchema(json!([1, 2])));
    assert!(e.contains("JSON schema"), "{e}");
    let e = err(Constraint::Regex("(unclosed".into()));
    assert!(e.contains("regex"), "{e}");
    let e = err(Constraint::Lark("start: missing_rule".into()));
    assert!(e.contains("Lark") && e.contains("missing_rule"), "{e}");
    // The same check without running anything.
    assert!(c
        .compile_constraint(None, &Constraint::JsonSchema(router_schema()))
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_requests_leave_batched_unconstrained_outputs_unchanged() {
    let c = client();
    let plain = |q: &str, seed: u64| {
        let mut r = GenerateRequest::chat(vec![ChatMessage::user(q)], 24);
        r.sampling = SamplingParams {
            temperature: if seed == 0 { 0.0 } else { 0.8 },
            seed,
            ..Default::default()
        };
        r
    };
    let qs = [
        ("What is a Python decorator?", 0),
        ("Reverse a string in Python.", 0),
        ("Explain recursion briefly.", 7),
    ];
    let mut alone = Vec::new();
    for (q, seed) in qs {
        alone.push(c.complete(plain(q, seed)).await.unwrap().tokens);
    }
    let mut constrained = Vec::new();
    let mut streams = Vec::new();
    for (i, (q, seed)) in qs.into_iter().enumerate() {
        constrained.push(
            c.generate(route_request(TASKS[i], SamplingParams::greedy()))
                .unwrap(),
        );
        streams.push(c.generate(plain(q, seed)).unwrap());
    }
    for (i, s) in streams.into_iter().enumerate() {
        let out = s.collect().await.unwrap();
        assert_eq!(out.tokens, alone[i], "request {i} changed when batched");
    }
    for (i, s) in constrained.into_iter().enumerate() {
        check_route(&s.collect().await.unwrap(), &format!("batched {i}"));
    }
}

/// The per-token cost of the constraint (mask and grammar update) against a decode step of the
/// model, one stream at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mask_cost_is_small_next_to_the_forward_pass() {
    let c = client();
    let t = Instant::now();
    c.compile_constraint(None, &Constraint::Json).unwrap();
    eprintln!("constraint factory built in {:?}", t.elapsed());
    let t = Instant::now();
    c.compile_constraint(None, &Constraint::JsonSchema(router_schema()))
        .unwrap();
    eprintln!("router schema compiled in {:?}", t.elapsed());

    let mut plain = route_request(TASKS[0], SamplingParams::greedy());
    plain.constraint = None;
    plain.max_tokens = 48;
    plain.ignore_eos = true;
    let free = c.complete(plain).await.unwrap();
    let per_free = free.usage.decode_time / free.usage.completion_tokens.max(1) as u32;

    let mut constrained = Vec::new();
    for task in TASKS {
        constrained.push(
            c.complete(route_request(task, SamplingParams::greedy()))
                .await
                .unwrap(),
        );
    }
    let tokens: usize = constrained.iter().map(|o| o.usage.completion_tokens).sum();
    let mask: std::time::Duration = constrained.iter().map(|o| o.usage.constraint_time).sum();
    let decode: std::time::Duration = constrained.iter().map(|o| o.usage.decode_time).sum();
    let per_mask = mask / tokens as u32;
    let per_step = decode / tokens as u32;
    eprintln!(
        "unconstrained decode {per_free:?}/token; constrained decode {per_step:?}/token, \
         of which constraint {per_mask:?}/token ({tokens} tokens)"
    );
    assert!(
        per_mask * 4 < per_free,
        "the constraint costs {per_mask:?} per token, decode {per_free:?}"
    );
}
