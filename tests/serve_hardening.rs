//! Hostile clients against a real server on 127.0.0.1 (issue 16, item 7): slow headers and
//! bodies, more connections than the cap, cross-site `text/plain` and cross-origin POSTs,
//! numbers that would wrap, huge stop strings, a dead engine, shutdown with a running job,
//! and a job whose run panics. After each, the server still answers ordinary requests.

mod serve_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use forgeline_engine::scheduler::{Completion, GenerateRequest, SchedulerConfig};
use forgeline_pipeline::llm::BoxFuture;
use forgeline_pipeline::{LanguageModel, Pipeline, PipelineConfig, Prompts};
use forgeline_sandbox::{Sandbox, SandboxConfig};
use forgeline_server::client::HttpClient;
use forgeline_server::{JobLimits, ModelCard, Server, ServerConfig};
use serde_json::{json, Value};
use serve_support::{shared_client, start_client, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn chat_body() -> Value {
    json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0})
}

/// Reads until the server closes the connection; what it sent and how long that took.
async fn until_closed(tcp: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, tcp.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {limit:?}; it sent {:?}",
        String::from_utf8_lossy(&got)
    );
    (String::from_utf8_lossy(&got).into_owned(), t.elapsed())
}

async fn still_serves(http: &HttpClient) {
    let r = http
        .post_json("/v1/chat/completions", &chat_body())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_idle_connections_and_stalled_bodies_are_cut() {
    let (client, card) = shared_client();
    let config = ServerConfig {
        header_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(400),
        ..ServerConfig::default()
    };
    let server = TestServer::start(client, card, config).await;

    // Half a request head, then nothing: closed after the header timeout.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        .await
        .unwrap();
    let (_, took) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(300), "{took:?}");

    // Connecting and sending nothing at all.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    until_closed(&mut tcp, Duration::from_secs(10)).await;

    // A keep-alive connection left idle after its answer.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // A body that stops halfway: 408, then closed.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"messages\": ",
    )
    .await
    .unwrap();
    let (got, _) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("no part of the request body"), "{got}");

    still_serves(&server.http()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_clients_wait_for_a_free_slot() {
    let (client, card) = shared_client();
    let config = ServerConfig {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let server = TestServer::start(client, card, config).await;
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        hogs.push(tcp);
    }
    // Both slots are held: a third client is not served...
    let http = server.http();
    let third = tokio::spawn(async move { http.get("/health").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served past the cap of 2"
    );
    // ...until one of them goes.
    drop(hogs.pop());
    let r = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a slot is free")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    drop(hogs);
    server.stop().await;
}

/// A raw POST with these headers and body; the status and the response text.
async fn raw(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let host = server.addr.to_string();
    let length = body.len().to_string();
    let mut all = vec![("Content-Length", length.as_str())];
    all.extend_from_slice(headers);
    exchange(server, "POST", path, &host, &all, body).await
}

/// One request on its own connection, sent as written; the status and the response text.
async fn exchange(
    server: &TestServer,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(req.as_bytes()).await.unwrap();
    let (got, _) = until_closed(&mut tcp, Duration::from_secs(60)).await;
    let status = got
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, got)
}

/// A model that answers no call: each either waits forever (counted: a model that must never
/// be called) or panics, as a bug deep in a stage would.
#[derive(Default)]
struct FaultyModel {
    calls: AtomicUsize,
    panics: bool,
}

impl FaultyModel {
    fn panicking() -> Self {
        Self {
            panics: true,
            ..Self::default()
        }
    }
}

impl LanguageModel for FaultyModel {
    fn complete(&self, _: GenerateRequest) -> BoxFuture<'_, forgeline_engine::Result<Completion>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panics {
            Box::pin(async { panic!("injected fault: the model exploded") })
        } else {
            Box::pin(std::future::pending())
        }
    }
    fn models(&self) -> Vec<String> {
        vec!["m".into()]
    }
    fn context_length(&self, _: Option<&str>) -> forgeline_engine::Result<usize> {
        Ok(2048)
    }
    fn prompt_tokens(&self, _: &GenerateRequest) -> forgeline_engine::Result<usize> {
        Ok(16)
    }
}

async fn pipeline_on(llm: Arc<dyn LanguageModel>) -> Pipeline {
    let sandbox = Sandbox::new(SandboxConfig::default()).await.unwrap();
    Pipeline::new(llm, sandbox, Prompts::built_in(), PipelineConfig::default())
}

const JOB: &str =
    r#"{"task": "Write add(a, b).", "tests": "from solution import add\nassert add(1, 2) == 3\n"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused_and_start_nothing() {
    let (client, card): (_, ModelCard) = shared_client();
    let model = Arc::new(FaultyModel::default());
    let config = ServerConfig {
        allowed_origins: forgeline_server::AllowedOrigins::parse(&["http://localhost:3000"])
            .unwrap(),
        ..ServerConfig::default()
    };
    let server = Server::new(client.clone(), vec![card], config)
        .with_jobs(pipeline_on(model.clone()).await, JobLimits::default());
    let jobs = server.jobs().unwrap();
    let server = TestServer::serve(server).await;
    let before = client.stats().models[0].prompt_tokens;
    let chat = chat_body().to_string();

    // What a web page's form or no-cors fetch sends: text/plain, from another origin.
    for path in ["/v1/jobs", "/v1/chat/completions", "/v1/completions"] {
        for ct in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
        ] {
            let body = if path == "/v1/jobs" { JOB } else { &chat };
            let (status, got) = raw(&server, path, &[("Content-Type", ct)], body).await;
            assert_eq!(status, 415, "{path} {ct}: {got}");
            assert!(
                got.contains("application/json") && got.contains(ct),
                "{got}"
            );
            assert!(got.contains("\"type\":\"invalid_request_error\""), "{got}");
            let (status, got) = raw(
                &server,
                path,
                &[("Content-Type", ct), ("Origin", "http://evil.example")],
                body,
            )
            .await;
            assert_eq!(status, 403, "{path} {ct}: {got}");
            assert!(
                got.contains("http://evil.example") && got.contains("--allowed-origin"),
                "{got}"
            );
            assert!(
                !got.to_ascii_lowercase().contains("access-control-"),
                "{got}"
            );
        }
        // Even a JSON body is refused from an origin not allowed, and without a type at all.
        let body = if path == "/v1/jobs" { JOB } else { &chat };
        let json_ct = ("Content-Type", "application/json");
        let (status, _) = raw(&server, path, &[json_ct, ("Origin", "null")], body).await;
        assert_eq!(status, 403);
        let (status, _) = raw(&server, path, &[], body).await;
        assert_eq!(status, 415);
    }
    assert_eq!(jobs.len(), 0, "a refused request started a job");
    assert_eq!(model.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        client.stats().models[0].prompt_tokens,
        before,
        "a refused request ran"
    );

    // An allowed origin: its preflight is answered, its requests carry CORS headers.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
          Origin: http://localhost:3000\r\nAccess-Control-Request-Method: POST\r\n\
          Access-Control-Request-Headers: content-type\r\n\r\n",
    )
    .await
    .unwrap();
    let (got, _) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    let lower = got.to_ascii_lowercase();
    assert!(got.starts_with("HTTP/1.1 204"), "{got}");
    assert!(
        lower.contains("access-control-allow-origin: http://localhost:3000"),
        "{got}"
    );
    assert!(
        lower.contains("access-control-allow-methods: get, post"),
        "{got}"
    );
    assert!(
        lower.contains("access-control-allow-headers: authorization, content-type"),
        "{got}"
    );
    let origin = ("Origin", "http://localhost:3000");
    let json_ct = ("Content-Type", "application/json; charset=utf-8");
    let (status, got) = raw(&server, "/v1/chat/completions", &[json_ct, origin], &chat).await;
    assert_eq!(status, 200, "{got}");
    assert!(got
        .to_ascii_lowercase()
        .contains("access-control-allow-origin: http://localhost:3000"));
    // No Origin (curl, SDKs): served, and no CORS headers.
    let (status, got) = raw(&server, "/v1/chat/completions", &[json_ct], &chat).await;
    assert_eq!(status, 200, "{got}");
    assert!(
        !got.to_ascii_lowercase().contains("access-control-"),
        "{got}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_and_stop_strings_get_400_naming_the_field() {
    let (client, card) = shared_client();
    let server = TestServer::start(client, card, ServerConfig::default()).await;
    let http = server.http();
    let cases = [
        ("max_tokens", json!(u64::MAX)),
        ("max_tokens", json!(1u64 << 63)),
        ("max_completion_tokens", json!(u64::MAX)),
        ("temperature", json!(1e39)),
        ("stop", json!("x".repeat(100_000))),
        ("stop", json!(vec!["y".repeat(1000); 16])),
        ("dry_penalty_last_n", json!(i64::MIN)),
    ];
    for (k, v) in cases {
        let mut body = chat_body();
        body[k] = v;
        let r = http.post_json("/v1/chat/completions", &body).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{k}: {}", r.text());
        let e = &r.json().unwrap()["error"];
        assert_eq!(e["param"], k, "{e}");
        assert_eq!(e["type"], "invalid_request_error");
        let mut completion = json!({"prompt": "x", "max_tokens": 2});
        completion[k] = body[k].clone();
        let r = http
            .post_json("/v1/completions", &completion)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{k}: {}", r.text());
    }
    still_serves(&http).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_503_once_the_engine_has_stopped() {
    let (client, card) = start_client(SchedulerConfig::default());
    let server = TestServer::start(client.clone(), card, ServerConfig::default()).await;
    let http = server.http();
    let r = http.get("/health").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json().unwrap()["status"], "ok");

    client.shut_down();
    for _ in 0..100 {
        if !client.is_alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http.get("/health").await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["status"], "engine_stopped");
    assert!(v["error"]["message"].as_str().unwrap().contains("engine"));
    let r = http
        .post_json("/v1/chat/completions", &chat_body())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    server.stop().await;
}

async fn submit(http: &HttpClient) -> String {
    let task: Value = serde_json::from_str(JOB).unwrap();
    let r = http.post_json("/v1/jobs", &task).await.unwrap();
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    r.json().unwrap()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_fails_with_the_panic_and_frees_its_slot() {
    let (client, card) = shared_client();
    let server = Server::new(client, vec![card], ServerConfig::default()).with_jobs(
        pipeline_on(Arc::new(FaultyModel::panicking())).await,
        JobLimits {
            max_running: 1,
            max_kept: 8,
        },
    );
    let server = TestServer::serve(server).await;
    let http = server.http();
    for _ in 0..2 {
        // The second fits only if the first freed its one slot.
        let id = submit(&http).await;
        let mut s = http
            .get_stream(&format!("/v1/jobs/{id}/events"))
            .await
            .unwrap();
        let mut end = Value::Null;
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(d) = s.next_data().await.unwrap() {
                if d != "[DONE]" {
                    end = serde_json::from_str(&d).unwrap();
                }
            }
        });
        read.await.expect("the job's event stream ends");
        assert_eq!(end["object"], "job.end", "{end}");
        assert_eq!(end["state"], "failed", "{end}");
        assert!(
            end["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the model exploded"),
            "{end}"
        );
        let v = http
            .get(&format!("/v1/jobs/{id}"))
            .await
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["state"], "failed");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the model exploded"),
            "{v}"
        );
    }
    let m = http.get("/metrics").await.unwrap().text();
    assert_eq!(
        serve_support::metric(&m, "forgeline_jobs_total{outcome=\"failed\"}"),
        Some(2.0),
        "{m}"
    );
    still_serves(&http).await;
    server.stop().await;
}

/// Delegates to the real engine after a pause, so that a job is surely running when the
/// shutdown comes.
struct SlowStart<M>(M, Duration);

impl<M: LanguageModel> LanguageModel for SlowStart<M> {
    fn complete(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'_, forgeline_engine::Result<Completion>> {
        Box::pin(async move {
            tokio::time::sleep(self.1).await;
            self.0.complete(req).await
        })
    }
    fn models(&self) -> Vec<String> {
        self.0.models()
    }
    fn context_length(&self, m: Option<&str>) -> forgeline_engine::Result<usize> {
        self.0.context_length(m)
    }
    fn prompt_tokens(&self, req: &GenerateRequest) -> forgeline_engine::Result<usize> {
        self.0.prompt_tokens(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_job_finish_though_nobody_watches_it() {
    let (client, card) = shared_client();
    let llm = Arc::new(SlowStart(client.clone(), Duration::from_millis(300)));
    let sandbox = Sandbox::new(SandboxConfig::default()).await.unwrap();
    let pipeline = Pipeline::new(
        llm,
        sandbox,
        Prompts::built_in(),
        PipelineConfig::parse(serve_support::FAST_JOB).unwrap(),
    );
    let config = ServerConfig {
        grace_period: Duration::from_secs(300),
        ..ServerConfig::default()
    };
    let server = Server::new(client, vec![card], config).with_jobs(pipeline, JobLimits::default());
    let jobs = server.jobs().unwrap();
    let server = TestServer::serve(server).await;
    let id = submit(&server.http()).await;
    // No event stream is open: only the grace period keeps the job alive.
    let stopped = server.stop_within(Duration::from_secs(310)).await;
    let job = jobs.get(&id).unwrap();
    let v = job.to_json();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(v["output"].as_str().is_some_and(|o| !o.is_empty()), "{v}");
    assert_eq!(
        (stopped.jobs_finished, stopped.jobs_cancelled),
        (1, 0),
        "{stopped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_outlives_the_grace_period_is_cancelled_at_its_end() {
    let (client, card) = shared_client();
    let model = Arc::new(FaultyModel::default());
    let config = ServerConfig {
        grace_period: Duration::from_millis(800),
        ..ServerConfig::default()
    };
    let server = Server::new(client, vec![card], config)
        .with_jobs(pipeline_on(model.clone()).await, JobLimits::default());
    let jobs = server.jobs().unwrap();
    let server = TestServer::serve(server).await;
    let id = submit(&server.http()).await;
    for _ in 0..100 {
        if model.calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let stopped = server.stop().await;
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "cut before the grace period: {:?}",
        t.elapsed()
    );
    assert_eq!(
        (stopped.jobs_finished, stopped.jobs_cancelled),
        (0, 1),
        "{stopped:?}"
    );
    let v = jobs.get(&id).unwrap().to_json();
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("grace period"),
        "{v}"
    );
}

/// A GET with this `Host`; the status and the response text.
async fn get_with_host(server: &TestServer, path: &str, host: &str) -> (u16, String) {
    exchange(server, "GET", path, host, &[], "").await
}

/// DNS rebinding: a page on evil.example rebinds its name to 127.0.0.1; its same-origin
/// GETs carry no `Origin`, only `Host: evil.example`. A keyless server refuses them; the
/// loopback names and addresses still work, and a server with a key needs no such check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_server_refuses_foreign_host_names() {
    let (client, card) = shared_client();
    let server = TestServer::start(client.clone(), card.clone(), ServerConfig::default()).await;
    for path in ["/v1/models", "/metrics", "/health", "/v1/jobs/1"] {
        for host in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
        ] {
            let (status, got) = get_with_host(&server, path, host).await;
            assert_eq!(status, 403, "{path} {host}: {got}");
            assert!(
                got.contains(host) && got.contains("--api-key-file"),
                "{got}"
            );
        }
    }
    let port = server.addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]".to_string(),
    ] {
        let (status, got) = get_with_host(&server, "/v1/models", &host).await;
        assert_eq!(status, 200, "{host}: {got}");
    }
    server.stop().await;

    let keyed = ServerConfig {
        api_key: Some(forgeline_server::auth::ApiKey::new("k3y").unwrap()),
        ..ServerConfig::default()
    };
    let server = TestServer::start(client, card, keyed).await;
    let (status, got) = get_with_host(&server, "/health", "evil.example").await;
    assert_eq!(status, 200, "{got}");
    server.stop().await;
}
