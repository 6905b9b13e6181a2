//! Jobs that outlive the process (issue 21): the real `forgeline serve` binary on the default
//! model keeps its jobs in `--data-dir`. A finished job's result and events are there after
//! a restart; a job cut off by SIGKILL runs again under its id after a restart, and its
//! events say so; unreadable files in the store do not stop a start; one server a store.

mod serve_support;

use std::path::Path;
use std::process::Command;

use axum::http::{Method, StatusCode};
use forgeline_server::client::HttpClient;
use serde_json::{json, Value};
use serve_support::{models_dir, ServeProcess};

fn task() -> Value {
    json!({
        "task": "Write a Python function add(a, b) that returns the sum of a and b.",
        "tests": "from solution import add\nassert add(2, 3) == 5\n",
        "entry_point": "add",
        "format": "code",
    })
}

/// A server on `data` with the short pipeline config.
fn serve(data: &Path) -> ServeProcess {
    let config = data.join("fast.toml");
    std::fs::write(&config, serve_support::FAST_JOB).unwrap();
    ServeProcess::start(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--keep-jobs-for",
        "1h",
    ])
}

async fn submit(http: &HttpClient) -> String {
    let r = http.post_json("/v1/jobs", &task()).await.unwrap();
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    r.json().unwrap()["id"].as_str().unwrap().to_string()
}

/// Every event of the job up to `[DONE]`.
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

async fn job(http: &HttpClient, id: &str) -> Value {
    let r = http.get(&format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json().unwrap()
}

#[test]
fn a_finished_job_and_its_events_are_there_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = serve(data.path());
    assert!(
        server.banner.contains("0 finished, 0 running again"),
        "{}",
        server.banner
    );
    let http = HttpClient::new(server.addr);
    let (id, evs, done) = rt.block_on(async {
        let id = submit(&http).await;
        let evs = events(&http, &id).await;
        (id.clone(), evs, job(&http, &id).await)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(evs.last().unwrap()["state"], "succeeded");

    // One server a data directory: a second one (given it as FORGELINE_DATA_DIR, as every
    // flag can be) is refused at once, naming the flag.
    // (Under `timeout`, and with a default data directory of its own: were the variable
    // not read, it would start and never end.)
    let elsewhere = tempfile::tempdir().unwrap();
    let mut second = Command::new("timeout");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FORGELINE_")) {
        second.env_remove(k);
    }
    let out = second
        .args([
            "60",
            env!("CARGO_BIN_EXE_forgeline"),
            "serve",
            "--port",
            "0",
        ])
        .arg("--models-dir")
        .arg(models_dir())
        .env("FORGELINE_DATA_DIR", data.path())
        .env("XDG_DATA_HOME", elsewhere.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");

    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");

    // Something unreadable in the store does not stop the next start.
    let jobs = data.path().join("jobs");
    std::fs::create_dir(jobs.join("job-garbage")).unwrap();
    std::fs::write(jobs.join("job-garbage/job.json"), "{\"id\": ").unwrap();

    let server = serve(data.path());
    assert!(
        server.banner.contains("1 finished, 0 running again")
            && server.banner.contains("1 unreadable, skipped"),
        "{}",
        server.banner
    );
    let http = HttpClient::new(server.addr);
    rt.block_on(async {
        let again = job(&http, &id).await;
        assert_eq!(again, done, "the job as it was");
        assert_eq!(events(&http, &id).await, evs, "its events as they were");
        // DELETE forgets it, on disk too.
        let r = http
            .request(Method::DELETE, &format!("/v1/jobs/{id}"), None)
            .await
            .unwrap();
        assert_eq!(r.json().unwrap()["deleted"], true);
        let r = http.get(&format!("/v1/jobs/{id}")).await.unwrap();
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    });
    assert!(!jobs.join(&id).exists());
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");
}

#[test]
fn a_job_cut_off_by_sigkill_runs_again_under_its_id_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = serve(data.path());
    let http = HttpClient::new(server.addr);
    let (id, first) = rt.block_on(async {
        let id = submit(&http).await;
        // Wait for its first stage event: it is running.
        let mut s = http
            .get_stream(&format!("/v1/jobs/{id}/events"))
            .await
            .unwrap();
        let first: Value = serde_json::from_str(&s.next_data().await.unwrap().unwrap()).unwrap();
        (id, first)
    });
    assert_eq!(first["object"], "job.event", "{first}");
    server.kill();
    let record: Value = serde_json::from_slice(
        &std::fs::read(data.path().join("jobs").join(&id).join("job.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["state"], "running", "{record}");

    let server = serve(data.path());
    assert!(
        server.banner.contains("0 finished, 1 running again"),
        "{}",
        server.banner
    );
    let http = HttpClient::new(server.addr);
    rt.block_on(async {
        let evs = events(&http, &id).await;
        let requeued: Vec<&Value> = evs
            .iter()
            .filter(|e| e["object"] == "job.requeued")
            .collect();
        assert_eq!(requeued.len(), 1, "{evs:?}");
        assert_eq!(requeued[0]["run"], 2);
        assert!(
            requeued[0]["message"]
                .as_str()
                .unwrap()
                .contains("runs again from the start under the same id"),
            "{}",
            requeued[0]
        );
        let end = evs.last().unwrap();
        assert_eq!(end["object"], "job.end");
        assert_eq!(end["state"], "succeeded", "{evs:?}");
        // The second run's stages follow the note: the router started again.
        let at = evs
            .iter()
            .position(|e| e["object"] == "job.requeued")
            .unwrap();
        assert!(evs[at..].iter().any(|e| e["stage"] == "router"), "{evs:?}");
        let done = job(&http, &id).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["runs"], 2, "{done}");
        assert!(
            done["output"].as_str().unwrap().contains("def add"),
            "{done}"
        );
    });
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");
    let record: Value = serde_json::from_slice(
        &std::fs::read(data.path().join("jobs").join(&id).join("job.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["state"], "succeeded", "{record}");
}
