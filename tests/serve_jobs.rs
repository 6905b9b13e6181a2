//! Pipeline jobs over HTTP on the default model: a job runs end to end and its event stream
//! shows every stage it went through; jobs past the limit get 429; a cancelled job stops and
//! frees its LLM calls.

mod serve_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use forgeline_pipeline::{Pipeline, PipelineConfig, Prompts, Stage};
use forgeline_sandbox::{Sandbox, SandboxConfig};
use forgeline_server::client::HttpClient;
use forgeline_server::{JobLimits, ModelCard, Server, ServerConfig};
use serde_json::{json, Value};
use serve_support::{metric, shared_client};
use tokio::net::TcpListener;

async fn events(http: &HttpClient, id: &str) -> Vec<Value> {
    let mut s = http
        .get_stream(&format!("/v1/jobs/{id}/events"))
        .await
        .unwrap();
    assert_eq!(s.status, StatusCode::OK);
    let mut out = Vec::new();
    while let Some(d) = s.next_data().await.unwrap() {
        if d == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(&d).unwrap());
    }
    panic!("the event stream ended without [DONE]: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_end_to_end_and_streams_its_stages() {
    let (client, card): (_, ModelCard) = shared_client();
    let sandbox = Sandbox::new(SandboxConfig::default()).await.unwrap();
    let config = PipelineConfig::parse(serve_support::FAST_JOB).unwrap();
    let pipeline = Pipeline::new(
        Arc::new(client.clone()),
        sandbox,
        Prompts::built_in(),
        config,
    );
    let limits = JobLimits {
        max_running: 1,
        max_kept: 8,
    };
    let server = Server::new(client.clone(), vec![card], ServerConfig::default())
        .with_jobs(pipeline, limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = HttpClient::new(listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(listener, async move {
        let _ = stopped.await;
    }));

    let task = json!({
        "task": "Write a Python function add(a, b) that returns the sum of a and b.",
        "tests": "from solution import add\nassert add(2, 3) == 5\n",
        "entry_point": "add",
        "format": "code",
    });
    let r = http.post_json("/v1/jobs", &task).await.unwrap();
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let job = r.json().unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["state"], "running");
    assert_eq!(r.headers["location"], format!("/v1/jobs/{id}"));

    // One job at a time here: a second is refused whole.
    let r = http.post_json("/v1/jobs", &task).await.unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");

    let evs = events(&http, &id).await;
    let end = evs.last().unwrap();
    assert_eq!(end["object"], "job.end");
    assert_eq!(end["state"], "succeeded", "{evs:?}");
    let stages: BTreeSet<&str> = evs.iter().filter_map(|e| e["stage"].as_str()).collect();
    // Every stage shows (the retry manager reports each subtask's decision).
    for stage in Stage::ALL.map(Stage::name) {
        assert!(stages.contains(stage), "no `{stage}` event in {stages:?}");
    }
    // A late reader gets the same events.
    assert_eq!(events(&http, &id).await, evs);

    let done = http
        .get(&format!("/v1/jobs/{id}"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(done["state"], "succeeded");
    assert!(
        done["output"].as_str().unwrap().contains("def add"),
        "{done}"
    );
    assert!(done["result"]["files"]
        .as_array()
        .is_some_and(|f| !f.is_empty()));
    assert_eq!(done["events"], evs.len() - 1);

    let m = http.get("/metrics").await.unwrap().text();
    assert_eq!(
        metric(&m, "forgeline_jobs_total{outcome=\"succeeded\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "forgeline_stage_duration_seconds_count{stage=\"router\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        m.contains("forgeline_stage_pass_ratio{stage=\"final_validator\"}"),
        "{m}"
    );

    // A cancelled job stops at once, and its LLM calls end with it.
    let r = http.post_json("/v1/jobs", &task).await.unwrap();
    let id2 = r.json().unwrap()["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = http
        .request(Method::DELETE, &format!("/v1/jobs/{id2}"), None)
        .await
        .unwrap();
    let v = r.json().unwrap();
    assert_eq!(
        (v["state"].as_str(), v["deleted"].as_bool()),
        (Some("cancelled"), Some(false))
    );
    let evs = events(&http, &id2).await;
    assert_eq!(evs.last().unwrap()["state"], "cancelled");
    for _ in 0..100 {
        if client.stats().running == 0 && client.stats().waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.stats().running, 0, "{:?}", client.stats());
    // Deleting a finished job removes it.
    let r = http
        .request(Method::DELETE, &format!("/v1/jobs/{id2}"), None)
        .await
        .unwrap();
    assert_eq!(r.json().unwrap()["deleted"], true);
    let r = http.get(&format!("/v1/jobs/{id2}")).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = http
        .post_json(
            "/v1/jobs",
            &json!({"task": "x", "files": [{"name": "a b.py", "content": ""}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json().unwrap()["error"]["param"], "files");

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
