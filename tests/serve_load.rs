//! 64 concurrent streaming clients, a quarter of which disconnect midway: every other client
//! gets a complete answer, and afterwards no sequence is left running and KV memory is back to
//! its idle level (only what the prefix cache holds).

mod serve_support;

use std::time::Duration;

use forgeline_engine::scheduler::SchedulerConfig;
use forgeline_server::ServerConfig;
use serde_json::{json, Value};
use serve_support::{metric, start_client, TestServer};

const CLIENTS: usize = 64;
const MAX_TOKENS: usize = 12;
/// Chunks a disconnecting client reads before it goes away.
const READ_BEFORE_LEAVING: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_clients_free_their_work_and_the_rest_finish() {
    let (client, card) = start_client(SchedulerConfig::default());
    let server = TestServer::start(client.clone(), card, ServerConfig::default()).await;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let http = server.http();
            tokio::spawn(async move {
                let leaves = i % 4 == 0;
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Client {i}: name a Python builtin.")}],
                    "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true, "stream": true,
                    "stream_options": {"include_usage": true},
                });
                let mut s = http.post_stream("/v1/chat/completions", &body).await.unwrap();
                assert_eq!(s.status, 200);
                let mut chunks = 0;
                while let Some(d) = s.next_data().await.unwrap() {
                    if d == "[DONE]" {
                        return (leaves, chunks, true);
                    }
                    let v: Value = serde_json::from_str(&d).unwrap();
                    assert!(v.get("error").is_none(), "client {i}: {v}");
                    if let Some(u) = v.get("usage") {
                        assert_eq!(u["completion_tokens"], MAX_TOKENS, "client {i}");
                    }
                    chunks += 1;
                    if leaves && chunks == READ_BEFORE_LEAVING {
                        // Dropping the stream closes the connection.
                        return (leaves, chunks, false);
                    }
                }
                (leaves, chunks, false)
            })
        })
        .collect();
    let mut complete = 0;
    for t in tasks {
        let (leaves, chunks, done) = t.await.unwrap();
        if leaves {
            assert!(!done);
        } else {
            assert!(done, "a staying client got {chunks} chunks and no [DONE]");
            complete += 1;
        }
    }
    assert_eq!(complete, CLIENTS - CLIENTS / 4);

    // The engine notices the disconnections at its next steps.
    let mut st = client.stats();
    for _ in 0..300 {
        if st.running == 0 && st.waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = client.stats();
    }
    let m = &st.models[0];
    assert_eq!((st.running, st.waiting), (0, 0), "{st:?}");
    assert_eq!(
        m.kv_used_bytes, m.kv_cached_bytes,
        "KV beyond the prefix cache: {st:?}"
    );
    assert_eq!(
        m.finished as usize + m.cancelled as usize,
        CLIENTS,
        "{st:?}"
    );
    assert_eq!(m.cancelled as usize, CLIENTS / 4, "{st:?}");

    // /metrics says the same.
    let text = server.http().get("/metrics").await.unwrap().text();
    let model = "{model=\"smollm2-135m-instruct\"}";
    assert_eq!(
        metric(&text, &format!("forgeline_running_sequences{model}")),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, &format!("forgeline_queue_depth{model}")),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, &format!("forgeline_kv_used_bytes{model}")),
        metric(&text, &format!("forgeline_kv_cached_bytes{model}")),
    );
    assert_eq!(
        metric(
            &text,
            &format!("forgeline_sequences_cancelled_total{model}")
        ),
        Some((CLIENTS / 4) as f64)
    );
    server.stop().await;
}
