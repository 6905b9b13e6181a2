//! The HTTP API against a real server on 127.0.0.1:0 over the default model: answers whole and
//! streamed, constrained JSON, metrics, and every kind of bad input with its status and
//! message.

mod serve_support;

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use forgeline_engine::scheduler::{ModelSchedulerConfig, SchedulerConfig};
use forgeline_server::client::{EventStream, HttpClient};
use forgeline_server::{ApiKey, ServerConfig};
use serde_json::{json, Value};
use serve_support::{metric, shared_client, start_client, TestServer};

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// Reads a stream to its end: the chunks' JSON, and whether `[DONE]` came last.
async fn drain(mut s: EventStream) -> (Vec<Value>, bool) {
    let mut chunks = Vec::new();
    while let Some(d) = s.next_data().await.unwrap() {
        if d == "[DONE]" {
            assert!(
                s.next_data().await.unwrap().is_none(),
                "nothing after [DONE]"
            );
            return (chunks, true);
        }
        chunks.push(serde_json::from_str(&d).unwrap());
    }
    (chunks, false)
}

/// Status, error message and param of an error response.
async fn error_of(
    http: &HttpClient,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> (StatusCode, String, Value) {
    let r = http.request(method.clone(), path, body).await.unwrap();
    let v = r
        .json()
        .unwrap_or_else(|e| panic!("{method} {path}: {}: {e}: {}", r.status, r.text()));
    let err = &v["error"];
    assert!(err["type"].is_string(), "OpenAI-shaped error expected: {v}");
    (
        r.status,
        err["message"].as_str().unwrap().to_string(),
        err["param"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_whole_and_streamed_with_usage() {
    let (client, card) = shared_client();
    let server = TestServer::start(client, card, ServerConfig::default()).await;
    let http = server.http();

    let models = http.get("/v1/models").await.unwrap().json().unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m-instruct");
    let health = http.get("/health").await.unwrap();
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json().unwrap()["status"], "ok");

    let r = http
        .post_json("/v1/chat/completions", &chat("Say hello.", 8))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let whole = r.json().unwrap();
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let usage = &whole["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion_tokens), "{usage}");

    // The same request streamed (greedy): the same text, then usage, then [DONE].
    let mut body = chat("Say hello.", 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = http
        .post_stream("/v1/chat/completions", &body)
        .await
        .unwrap();
    assert_eq!(s.status, StatusCode::OK);
    let (chunks, done) = drain(s).await;
    assert!(done, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], completion_tokens);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finish == "stop" || finish == "length", "{finish}");

    // Legacy completions, with a stop string.
    let r = http
        .post_json(
            "/v1/completions",
            &json!({"prompt": "def add(a, b):\n", "max_tokens": 24, "temperature": 0, "stop": ["\n\n"]}),
        )
        .await
        .unwrap();
    let v = r.json().unwrap();
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains("\n\n"));
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let m = http.get("/metrics").await.unwrap().text();
    assert_eq!(
        metric(
            &m,
            "forgeline_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "forgeline_completion_tokens_total{model=\"smollm2-135m-instruct\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(m.contains("forgeline_kv_used_bytes{model=\"smollm2-135m-instruct\"}"));
    // The three answers above (whole, streamed, legacy) in the completion histograms.
    let model = "model=\"smollm2-135m-instruct\"";
    let e2e = "forgeline_request_e2e_latency_seconds";
    assert_eq!(
        metric(&m, &format!("{e2e}_count{{{model}}}")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!("{e2e}_bucket{{{model},le=\"+Inf\"}}")),
        Some(3.0),
        "{m}"
    );
    assert!(metric(&m, &format!("{e2e}_sum{{{model}}}")).unwrap() > 0.0);
    let ttft = "forgeline_request_time_to_first_token_seconds";
    assert!(
        metric(&m, &format!("{ttft}_count{{{model}}}")).unwrap() >= 1.0,
        "{m}"
    );
    let queue = "forgeline_request_queue_time_seconds";
    assert_eq!(metric(&m, &format!("{queue}_count{{{model}}}")), Some(3.0));
    let prompt = "forgeline_request_prompt_tokens";
    assert_eq!(metric(&m, &format!("{prompt}_count{{{model}}}")), Some(3.0));
    // Both chat answers generated `completion_tokens` each; the legacy one some more.
    let completion = "forgeline_request_completion_tokens";
    assert!(
        metric(&m, &format!("{completion}_sum{{{model}}}")).unwrap()
            >= 2.0 * completion_tokens as f64,
        "{m}"
    );
    // The gauges llm-d's gateway reads, under vLLM's names.
    let model_name = "model_name=\"smollm2-135m-instruct\"";
    assert!(metric(&m, &format!("vllm:num_requests_waiting{{{model_name}}}")).is_some());
    // KV usage is the share of the budget sequences hold (blocks only the prefix cache keeps
    // are free, as in vLLM), from the same snapshot as the bytes.
    let used = metric(&m, &format!("forgeline_kv_used_bytes{{{model}}}")).unwrap();
    let active = metric(&m, &format!("forgeline_kv_active_bytes{{{model}}}")).unwrap();
    let budget = metric(&m, &format!("forgeline_kv_budget_bytes{{{model}}}")).unwrap();
    assert!(active <= used, "active {active}, used {used}");
    for name in ["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"] {
        let usage = metric(&m, &format!("{name}{{{model_name}}}")).unwrap();
        assert!((0.0..=1.0).contains(&usage), "{name} {usage}");
        assert!(
            (usage - active / budget).abs() < 1e-9,
            "{name} {usage}: {m}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_json_schema_gives_schema_valid_json() {
    let (client, card) = shared_client();
    let server = TestServer::start(client, card, ServerConfig::default()).await;
    let mut body = chat("Give a Python function name and its argument count.", 48);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "fn", "schema": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "args": {"type": "integer"}},
        "required": ["name", "args"], "additionalProperties": false
    }}});
    let r = server
        .http()
        .post_json("/v1/chat/completions", &body)
        .await
        .unwrap();
    let v = r.json().unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    assert!(
        parsed["name"].is_string() && parsed["args"].is_i64(),
        "{parsed}"
    );
    assert_eq!(parsed.as_object().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // An invalid schema is the request's fault.
    body["response_format"]["json_schema"]["schema"] = json!({"type": "no-such-type"});
    let (status, msg, param) = error_of(
        &server.http(),
        Method::POST,
        "/v1/chat/completions",
        Some(body.to_string().into()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{msg}");
    assert_eq!(param, "response_format");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regex_or_a_lark_grammar_holds_the_output_and_a_bad_one_names_its_field() {
    let (client, card) = shared_client();
    let server = TestServer::start(client, card, ServerConfig::default()).await;
    let mut body = chat("Give a date.", 24);
    body["regex"] = json!("[0-9]{4}-[0-9]{2}-[0-9]{2}");
    let r = server
        .http()
        .post_json("/v1/chat/completions", &body)
        .await
        .unwrap();
    let v = r.json().unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let b = content.as_bytes();
    assert!(
        b.len() == 10
            && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }),
        "{content:?}"
    );
    let mut body = chat("Is water wet?", 8);
    body["grammar"] = json!("start: \"yes\" | \"no\"");
    let v = server
        .http()
        .post_json("/v1/chat/completions", &body)
        .await
        .unwrap()
        .json()
        .unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content == "yes" || content == "no", "{content:?}");
    // A grammar that does not compile is the request's fault, and names its field.
    for (field, bad) in [("regex", "([0-9"), ("grammar", "start: undefined_rule")] {
        let mut body = chat("Hi", 8);
        body[field] = json!(bad);
        let (status, msg, param) = error_of(
            &server.http(),
            Method::POST,
            "/v1/chat/completions",
            Some(body.to_string().into()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{msg}");
        assert_eq!(param, field, "{msg}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_a_message_naming_the_field() {
    let (client, card) = shared_client();
    let config = ServerConfig {
        body_limit: 100_000,
        ..ServerConfig::default()
    };
    let server = TestServer::start(client, card, config).await;
    let http = server.http();
    let post = |body: String| {
        let http = http.clone();
        async move {
            error_of(
                &http,
                Method::POST,
                "/v1/chat/completions",
                Some(body.into()),
            )
            .await
        }
    };

    let (s, m, _) = post("{\"messages\": [".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(m.contains("not valid JSON"), "{m}");

    let mut wrong = chat("x", 4);
    wrong["temperature"] = json!("warm");
    let (s, m, p) = post(wrong.to_string()).await;
    assert_eq!((s, p), (StatusCode::BAD_REQUEST, json!("temperature")));
    assert_eq!(m, "`temperature` must be a number, not a string");

    let mut dry = chat("x", 4);
    dry["dry_penalty_last_n"] = json!(-5);
    let (s, m, p) = post(dry.to_string()).await;
    assert_eq!(
        (s, p),
        (StatusCode::BAD_REQUEST, json!("dry_penalty_last_n"))
    );
    assert!(m.starts_with("`dry_penalty_last_n` must be -1"), "{m}");

    let mut unknown = chat("x", 4);
    unknown["model"] = json!("gpt-4o");
    let (s, m, p) = post(unknown.to_string()).await;
    assert_eq!((s, p), (StatusCode::NOT_FOUND, json!("model")));
    assert!(
        m.contains("gpt-4o") && m.contains("smollm2-135m-instruct"),
        "{m}"
    );

    let mut n2 = chat("x", 4);
    n2["n"] = json!(17);
    let (s, _, p) = post(n2.to_string()).await;
    assert_eq!((s, p), (StatusCode::BAD_REQUEST, json!("n")));

    // ~9000 tokens: more than the 8192 of the context, within the body limit.
    let long = chat(&"word ".repeat(9000), 4).to_string();
    assert!(long.len() < 100_000);
    let (s, m, p) = post(long).await;
    assert_eq!((s, p), (StatusCode::BAD_REQUEST, json!("messages")));
    assert!(m.contains("8192"), "{m}");

    let mut too_many = chat("x", 4);
    too_many["max_tokens"] = json!(100_000);
    let (s, m, p) = post(too_many.to_string()).await;
    assert_eq!(
        (s, p),
        (StatusCode::BAD_REQUEST, json!("max_tokens")),
        "{m}"
    );

    let huge = chat(&"x".repeat(200_000), 4).to_string();
    let (s, m, _) = post(huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(m.contains("100000 bytes"), "{m}");

    let (s, _, _) = error_of(&http, Method::GET, "/v1/chat/completions", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_where_one_is_set() {
    let (client, card) = shared_client();
    let config = ServerConfig {
        api_key: Some(ApiKey::new("k-123").unwrap()),
        ..ServerConfig::default()
    };
    let server = TestServer::start(client, card, config).await;
    let (s, m, _) = error_of(&server.http(), Method::GET, "/v1/models", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(m.contains("Authorization: Bearer"), "{m}");
    let wrong = server.http().with_api_key("k-124");
    let (s, m, _) = error_of(
        &wrong,
        Method::POST,
        "/v1/chat/completions",
        Some(chat("x", 2).to_string().into()),
    )
    .await;
    assert_eq!(
        (s, m.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid API key")
    );
    let right = server.http().with_api_key("k-123");
    assert_eq!(
        right.get("/v1/models").await.unwrap().status,
        StatusCode::OK
    );
    let r = right
        .post_json("/v1/chat/completions", &chat("Hi", 2))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Liveness probes need no key.
    assert_eq!(
        server.http().get("/health").await.unwrap().status,
        StatusCode::OK
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_queue_limit_requests_get_429_and_are_not_queued() {
    // One running sequence, one waiting: the third request has no room.
    let (client, card) = start_client(SchedulerConfig {
        max_waiting: 1,
        per_model: ModelSchedulerConfig {
            max_running: 1,
            ..ModelSchedulerConfig::default()
        },
        ..SchedulerConfig::default()
    });
    let server = TestServer::start(client.clone(), card, ServerConfig::default()).await;
    let http = server.http();
    let mut long = chat("Count to one thousand.", 2000);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let mut running = http
        .post_stream("/v1/chat/completions", &long)
        .await
        .unwrap();
    assert!(running.next_data().await.unwrap().is_some(), "first chunk");
    let waiting = http
        .post_stream("/v1/chat/completions", &long)
        .await
        .unwrap();
    assert_eq!(waiting.status, StatusCode::OK);
    // The engine has taken it in when a step reports it waiting.
    let t0 = std::time::Instant::now();
    while client.stats().waiting != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            client.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let r = http
        .post_json("/v1/chat/completions", &chat("Hi", 4))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json().unwrap()["error"]["type"], "rate_limit_error");
    let st = client.stats();
    assert_eq!(
        (st.running, st.waiting),
        (1, 1),
        "the refused request was not queued"
    );
    // The running sequence holds KV that eviction cannot free.
    assert!(st.models[0].kv_active_bytes > 0, "{st:?}");

    // Both clients go away: both requests end and the engine is idle again.
    drop(running);
    drop(waiting);
    wait_idle(&client).await;
    let st = client.stats();
    assert_eq!(st.models[0].cancelled, 2);
    assert_eq!(st.models[0].kv_used_bytes, st.models[0].kv_cached_bytes);
    // Idle: what the cache keeps can all be evicted; no sequence holds KV.
    assert_eq!(st.models[0].kv_active_bytes, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_cuts_a_generation_short() {
    let (client, card) = shared_client();
    let config = ServerConfig {
        request_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    };
    let server = TestServer::start(client, card, config).await;
    let mut body = chat("Count to one thousand.", 4000);
    body["ignore_eos"] = json!(true);
    let v = server
        .http()
        .post_json("/v1/chat/completions", &body)
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 4000);
    server.stop().await;
}

async fn wait_idle(client: &forgeline_engine::scheduler::LlmClient) {
    for _ in 0..300 {
        let st = client.stats();
        if st.running == 0 && st.waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the engine is still busy: {:?}", client.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_grace_period() {
    let (client, card) = start_client(SchedulerConfig::default());
    let config = ServerConfig {
        grace_period: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start(client.clone(), card, config).await;
    let mut long = chat("Count to one thousand.", 4000);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let mut s = server
        .http()
        .post_stream("/v1/chat/completions", &long)
        .await
        .unwrap();
    assert!(s.next_data().await.unwrap().is_some());
    let stopping = tokio::spawn(server.stop());
    let mut last = String::new();
    while let Some(d) = s.next_data().await.unwrap() {
        last = d;
    }
    let v: Value = serde_json::from_str(&last).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{v}"
    );
    stopping.await.unwrap();
    wait_idle(&client).await;
    assert_eq!(client.stats().models[0].cancelled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_equal_separate_requests_with_successive_seeds_and_share_the_prompt() {
    let (client, card) = shared_client();
    let server = TestServer::start(client, card, ServerConfig::default()).await;
    let http = server.http();
    // At temperature 0 with seeds, as the issue asks: sampling at a higher temperature
    // would compare batched against lone decoding to the last bit.
    let mut body = chat("Name a colour.", 12);
    body["temperature"] = json!(0.0);
    body["seed"] = json!(40);
    let mut alone = Vec::new();
    for i in 0..3 {
        let mut one = body.clone();
        one["seed"] = json!(40 + i);
        let v = http
            .post_json("/v1/chat/completions", &one)
            .await
            .unwrap()
            .json()
            .unwrap();
        alone.push(v["choices"][0]["message"]["content"].clone());
    }
    body["n"] = json!(3);
    let v = http
        .post_json("/v1/chat/completions", &body)
        .await
        .unwrap()
        .json()
        .unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        assert_eq!(c["message"]["content"], alone[i], "choice {i}: {v}");
    }
    // The prompt is counted once; the completions add up.
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let single = http
        .post_json("/v1/chat/completions", &chat("Name a colour.", 12))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(prompt, single["usage"]["prompt_tokens"].as_u64().unwrap());

    // Streamed: every choice's chunks carry its index, each choice ends once, then [DONE].
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = http
        .post_json("/v1/chat/completions", &body)
        .await
        .unwrap()
        .text();
    let mut streamed = vec![String::new(); 3];
    let mut finished = [0; 3];
    let mut usage = None;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        if chunk["choices"].as_array().unwrap().is_empty() {
            usage = Some(chunk["usage"].clone());
            continue;
        }
        let c = &chunk["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        if let Some(t) = c["delta"]["content"].as_str() {
            streamed[i].push_str(t);
        }
        if !c["finish_reason"].is_null() {
            finished[i] += 1;
        }
    }
    assert_eq!(finished, [1, 1, 1], "{text}");
    for i in 0..3 {
        assert_eq!(json!(streamed[i]), alone[i], "choice {i}: {text}");
    }
    assert_eq!(usage.unwrap()["prompt_tokens"].as_u64(), Some(prompt));
    server.stop().await;
}
