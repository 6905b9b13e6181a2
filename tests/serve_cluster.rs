//! Cluster mode (issue 21): a real `nats-server` with JetStream on 127.0.0.1 and three real
//! `forgeline serve --cluster` nodes on the default model. Twelve jobs submitted to one node
//! are run by all three; a node killed mid-job has its job redelivered, which is finished
//! once, and the node restarted rejoins; the broker killed and restarted loses no job (the
//! nodes report unhealthy meanwhile); results and events read the same from every node; a
//! cancel on one node stops the job wherever it runs. A broker that cannot be reached, or has
//! no JetStream, is a clear start-up error.
//!
//! Needs the `nats-server` binary (.ci/run installs it); without it these tests say so and
//! pass without running.

mod serve_support;

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use forgeline_server::client::HttpClient;
use serde_json::{json, Value};
use serve_support::{metric, models_dir, ServeProcess};

/// A `nats-server` on a free port of 127.0.0.1 (JetStream's files in a directory of its
/// own, so that a restart finds them), stopped when dropped.
struct Nats {
    child: Option<Child>,
    port: u16,
    jetstream: bool,
    url: String,
    dir: tempfile::TempDir,
}

impl Nats {
    /// None (after saying why) when the binary is missing.
    fn start(jetstream: bool) -> Option<Nats> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = Nats {
            child: None,
            port,
            jetstream,
            url: format!("nats://127.0.0.1:{port}"),
            dir: tempfile::tempdir().unwrap(),
        };
        match nats.spawn() {
            Ok(()) => Some(nats),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "SKIPPED: the nats-server binary is not on PATH (apt-get install nats-server; \
                     .ci/run installs it)"
                );
                None
            }
            Err(e) => panic!("cannot run nats-server: {e}"),
        }
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.dir.path());
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let t = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Kills the broker (SIGKILL: no clean shutdown).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and JetStream directory.
    fn restart(&mut self) {
        self.kill();
        self.spawn().unwrap();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn task(n: usize) -> Value {
    json!({
        "task": format!("Write a Python function add(a, b) that returns the sum of a and b. (job {n})"),
        "tests": "from solution import add\nassert add(2, 3) == 5\n",
        "entry_point": "add",
        "format": "code",
    })
}

/// A node named `name` on the broker: one job at a time, a 5 s ack wait.
fn node(url: &str, name: &str, config: &Path) -> ServeProcess {
    ServeProcess::start(&[
        "--cluster",
        url,
        "--cluster-node",
        name,
        "--cluster-ack-wait",
        "5",
        "--max-jobs",
        "1",
        "--config",
        config.to_str().unwrap(),
    ])
}

async fn job(http: &HttpClient, id: &str) -> Value {
    let r = http.get(&format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json().unwrap()
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

/// Waits until `f` holds, for at most `limit`.
async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn finished(http: &HttpClient, ids: &[String]) -> usize {
    let mut n = 0;
    for id in ids {
        let r = http.get(&format!("/v1/jobs/{id}")).await.unwrap();
        if r.status == StatusCode::OK {
            let v: Value = r.json().unwrap();
            n += usize::from(v["state"] != "queued" && v["state"] != "running");
        }
    }
    n
}

#[test]
fn twelve_jobs_on_three_nodes_survive_a_killed_node_and_a_broker_restart() {
    let Some(mut nats) = Nats::start(true) else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fast.toml");
    std::fs::write(&config, serve_support::FAST_JOB).unwrap();
    let a = node(&nats.url, "a", &config);
    let b = node(&nats.url, "b", &config);
    let c = node(&nats.url, "c", &config);
    assert!(a.banner.contains("cluster nats://"), "{}", a.banner);
    let ha = HttpClient::new(a.addr);
    let hc = HttpClient::new(c.addr);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Twelve jobs, all posted to a.
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for n in 0..12 {
            let r = ha.post_json("/v1/jobs", &task(n)).await.unwrap();
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
            let v = r.json().unwrap();
            assert_eq!(v["state"], "queued", "{v}");
            ids.push(v["id"].as_str().unwrap().to_string());
        }
        ids
    });

    // Which node ran what, as seen while polling.
    let mut seen: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut note = |v: &Value| {
        if let Some(n) = v["node"].as_str() {
            seen.entry(v["id"].as_str().unwrap().to_string())
                .or_default()
                .insert(n.to_string());
        }
    };
    let on_b = rt.block_on(async {
        let t = Instant::now();
        loop {
            for id in &ids {
                let v = job(&ha, id).await;
                note(&v);
                if v["state"] == "running" && v["node"] == "b" {
                    return id.clone();
                }
            }
            assert!(t.elapsed() < Duration::from_secs(90), "b never ran a job");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // Let it get into its stages, then kill b (no heartbeat, no last writes) and start it
    // again: it rejoins and takes jobs.
    std::thread::sleep(Duration::from_secs(1));
    let ran_by_first_b = rt.block_on(async {
        let text = HttpClient::new(b.addr)
            .get("/metrics")
            .await
            .unwrap()
            .text();
        metric(&text, "forgeline_cluster_jobs_run_total").unwrap()
    });
    b.kill();
    let b = node(&nats.url, "b", &config);
    let hb = HttpClient::new(b.addr);

    // Some jobs done: restart the broker (SIGKILL). While it is away every node says it is
    // unhealthy, and a new job is refused with a clear error rather than accepted and lost.
    rt.block_on(until(
        "4 jobs finished",
        Duration::from_secs(240),
        async || finished(&ha, &ids).await >= 4,
    ));
    nats.kill();
    rt.block_on(async {
        for h in [&ha, &hb, &hc] {
            until(
                "a node reports the lost broker",
                Duration::from_secs(15),
                async || {
                    let r = h.get("/health").await.unwrap();
                    r.status == StatusCode::SERVICE_UNAVAILABLE
                        && r.json().unwrap()["status"] == "cluster_disconnected"
                },
            )
            .await;
        }
        let r = ha.post_json("/v1/jobs", &task(99)).await.unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(r.text().contains("could not be queued"), "{}", r.text());
        let text = ha.get("/metrics").await.unwrap().text();
        assert_eq!(metric(&text, "forgeline_cluster_connected"), Some(0.0));
    });
    std::thread::sleep(Duration::from_secs(2));
    nats.restart();
    rt.block_on(async {
        for h in [&ha, &hb, &hc] {
            until("a node reconnects", Duration::from_secs(30), async || {
                h.get("/health").await.unwrap().status == StatusCode::OK
            })
            .await;
        }
    });

    let done: Vec<Value> = rt.block_on(async {
        let t = Instant::now();
        let mut done = Vec::new();
        for id in &ids {
            loop {
                let v = job(&ha, id).await;
                note(&v);
                if v["state"] != "queued" && v["state"] != "running" {
                    done.push(v);
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(300),
                    "job {id} did not finish: {v}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        done
    });
    for v in &done {
        assert_eq!(v["state"], "succeeded", "{v}");
        assert!(v["output"].as_str().unwrap().contains("def add"), "{v}");
    }
    // All three ran jobs, and the restarted b too (its own count starts at 0).
    let nodes: BTreeSet<&String> = seen.values().flatten().collect();
    assert_eq!(nodes.len(), 3, "not every node ran a job: {seen:?}");
    assert!(seen[&on_b].contains("b"), "{seen:?}");

    rt.block_on(async {
        let text = hb.get("/metrics").await.unwrap().text();
        let ran_b = metric(&text, "forgeline_cluster_jobs_run_total").unwrap();
        assert!(ran_b >= 1.0, "the restarted node ran nothing: {text}");
        for (id, v) in ids.iter().zip(&done) {
            // The same job from every node, and the same events.
            assert_eq!(&job(&hc, id).await, v, "c reads the job as a does");
            assert_eq!(&job(&hb, id).await, v, "b reads the job as a does");
            let ev_a = events(&ha, id).await;
            assert_eq!(ev_a, events(&hc, id).await, "c streams the events a does");
            assert_eq!(ev_a, events(&hb, id).await, "b streams the events a does");
            // Exactly one end, last, and it succeeded.
            let ends = ev_a.iter().filter(|e| e["object"] == "job.end").count();
            assert_eq!(ends, 1, "{ev_a:?}");
            assert_eq!(ev_a.last().unwrap()["state"], "succeeded", "{ev_a:?}");
            if *id == on_b {
                // Redelivered after b stopped heartbeating, run again from its start.
                assert!(v["runs"].as_u64().unwrap() >= 2, "{v}");
                let at = ev_a
                    .iter()
                    .position(|e| e["object"] == "job.requeued")
                    .unwrap_or_else(|| panic!("no job.requeued: {ev_a:?}"));
                assert!(
                    ev_a[at..].iter().any(|e| e["stage"] == "router"),
                    "{ev_a:?}"
                );
            }
        }

        // The queue is empty; the nodes' shares add up.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut ran = 0.0;
        for h in [&ha, &hb, &hc] {
            let text = h.get("/metrics").await.unwrap().text();
            assert_eq!(
                metric(&text, "forgeline_cluster_queue_depth"),
                Some(0.0),
                "{text}"
            );
            assert_eq!(metric(&text, "forgeline_cluster_connected"), Some(1.0));
            assert!(metric(&text, "forgeline_cluster_broker_seconds_total").unwrap() > 0.0);
            ran += metric(&text, "forgeline_cluster_jobs_run_total").unwrap();
        }
        // With what the first b ran before it was killed, every job is counted.
        assert!(ran + ran_by_first_b >= 12.0, "{ran} + {ran_by_first_b}");

        // A cancel on a reaches the job wherever it is (queued or running on another node).
        let r = hc.post_json("/v1/jobs", &task(9)).await.unwrap();
        let id = r.json().unwrap()["id"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = ha
            .request(Method::DELETE, &format!("/v1/jobs/{id}"), None)
            .await
            .unwrap();
        let v = r.json().unwrap();
        assert_eq!(v["state"], "cancelled", "{v}");
        assert_eq!(v["deleted"], false, "{v}");
        assert_eq!(job(&hc, &id).await["state"], "cancelled");
        let evs = events(&hc, &id).await;
        assert_eq!(evs.last().unwrap()["state"], "cancelled", "{evs:?}");
        // Every node is free again soon: nothing keeps running the cancelled job.
        until(
            "the cancelled job stops",
            Duration::from_secs(10),
            async || {
                let mut busy = 0.0;
                for h in [&ha, &hb, &hc] {
                    let text = h.get("/metrics").await.unwrap().text();
                    busy += metric(&text, "forgeline_cluster_jobs_running").unwrap();
                }
                busy == 0.0
            },
        )
        .await;
        // A second DELETE removes the ended job, on every node.
        let r = hc
            .request(Method::DELETE, &format!("/v1/jobs/{id}"), None)
            .await
            .unwrap();
        assert_eq!(r.json().unwrap()["deleted"], true);
        let r = ha.get(&format!("/v1/jobs/{id}")).await.unwrap();
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    });
    let (code, rest) = a.terminate();
    assert_eq!(code, Some(0), "{rest}");
    drop((b, c));
    eprintln!("cluster test took {:?}", started.elapsed());
}

/// `forgeline serve --cluster URL` that should fail at start: its exit code and stderr.
fn refused(url: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new("timeout");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FORGELINE_")) {
        cmd.env_remove(k);
    }
    let out = cmd
        .args([
            "60",
            env!("CARGO_BIN_EXE_forgeline"),
            "serve",
            "--port",
            "0",
        ])
        .arg("--models-dir")
        .arg(models_dir())
        .env("FORGELINE_CLUSTER", url)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_broker_that_cannot_be_used_is_a_clear_start_up_error() {
    // Nothing listens on port 1.
    let (code, err) = refused("nats://127.0.0.1:1");
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("nats://127.0.0.1:1") && err.contains("cannot connect"),
        "{err}"
    );
    // Not a NATS URL at all: bad usage.
    let (code, err) = refused("http://[::1");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--cluster"), "{err}");
    // A broker without JetStream.
    let Some(plain) = Nats::start(false) else {
        return;
    };
    let (code, err) = refused(&plain.url);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains(&plain.url) && err.contains("JetStream"),
        "{err}"
    );
}
