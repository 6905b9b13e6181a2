//! The real `forgeline serve` binary: the official `openai` Python client talks to it, it
//! refuses to serve other hosts without a key, and SIGTERM stops it gracefully.

mod serve_support;

use std::process::Command;
use std::time::Duration;

use forgeline_server::client::HttpClient;
use serde_json::json;
use serve_support::{models_dir, ServeProcess};

/// The `openai` package, installed from PyPI when missing (CI's setup installs it first).
fn ensure_openai() {
    let has = || {
        Command::new("python3")
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has() {
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "openai",
            ])
            .output()
            .expect("run python3 -m pip");
        assert!(
            out.status.success() && has(),
            "cannot install the `openai` Python package:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_official_openai_client_works_against_the_server() {
    ensure_openai();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-forgeline-test\n").unwrap();
    let server = ServeProcess::start(&["--api-key-file", key_file.to_str().unwrap()]);
    assert!(server.banner.contains("bearer token"), "{}", server.banner);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/openai_client/check_openai.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{}/v1", server.addr))
        .arg("sk-forgeline-test")
        .arg("smollm2-135m-instruct")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python3 {script} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "chat stream usage",
        "completions stream",
        "json_schema",
        "n choices",
        "grammar",
        "chat logprobs",
        "chat stream logprobs",
        "completions logprobs",
        "tool call",
        "tool call stream",
        "tool round trip",
        "tool round trip stream",
        "named tool_choice",
        "unknown tool_choice is 400",
        "suffix without FIM tokens is 400",
        "wrong key is 401",
    ] {
        assert!(stdout.contains(&format!("ok {check}\n")), "{stdout}");
    }
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");
}

/// Fill in the middle over HTTP, with the official client, on a tiny random-weight model
/// whose vocabulary has Qwen2.5-Coder's FIM tokens (its tokenizer has no merges: one token a
/// byte, so the prompt's length is known exactly).
#[test]
fn fill_in_the_middle_runs_on_a_model_with_fim_tokens() {
    ensure_openai();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-fim.gguf");
    let shape = forgeline_engine::synthetic::preset("tiny").unwrap();
    forgeline_engine::synthetic::write_gguf(&shape, "Q8_0", 7, &model).unwrap();
    let server = ServeProcess::start(&["--model", model.to_str().unwrap()]);
    let script = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
prefix, suffix = "def add(a, b):\n    ", "\n    return total\n"
r = c.completions.create(model="tiny-fim", prompt=prefix, suffix=suffix, max_tokens=5,
                         temperature=0, extra_body={"ignore_eos": True})
assert r.usage.prompt_tokens == len(prefix) + len(suffix) + 3, r.usage
assert r.usage.completion_tokens == 5 and isinstance(r.choices[0].text, str), r
s = "".join(p.choices[0].text for p in c.completions.create(
    model="tiny-fim", prompt=prefix, suffix=suffix, max_tokens=5, temperature=0, stream=True,
    extra_body={"ignore_eos": True}) if p.choices)
assert s == r.choices[0].text, (s, r.choices[0].text)
print("ok fim")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(format!("http://{}/v1", server.addr))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok fim"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");
}

#[test]
fn an_open_server_listens_on_loopback_and_refuses_other_hosts() {
    let out = Command::new(env!("CARGO_BIN_EXE_forgeline"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--models-dir"])
        .arg(models_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--api-key-file") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );

    let server = ServeProcess::start(&[]);
    assert!(server.addr.ip().is_loopback());
    assert!(
        server.banner.contains("only this machine can connect"),
        "{}",
        server.banner
    );
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");
    assert!(rest.contains("stopped"), "{rest}");
}

#[test]
fn sigterm_lets_a_running_request_finish_within_the_grace_period() {
    let server = ServeProcess::start(&["--grace-period", "20"]);
    let addr = server.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, answer) = rt.block_on(async move {
        let http = HttpClient::new(addr);
        let body = json!({"messages": [{"role": "user", "content": "Count."}],
            "max_tokens": 40, "temperature": 0, "ignore_eos": true, "stream": true});
        let mut s = http
            .post_stream("/v1/chat/completions", &body)
            .await
            .unwrap();
        assert!(s.next_data().await.unwrap().is_some());
        // Mid-answer: the server stops accepting but finishes this one.
        let stopping = tokio::task::spawn_blocking(move || server.terminate());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            HttpClient::new(addr).get("/health").await.is_err(),
            "no new connections after SIGTERM"
        );
        let mut last = String::new();
        while let Some(d) = s.next_data().await.unwrap() {
            last = d;
        }
        let (code, _) = stopping.await.unwrap();
        (code, last)
    });
    assert_eq!(answer, "[DONE]");
    assert_eq!(code, Some(0));
}

#[test]
fn every_request_gets_an_access_log_line_as_json_with_a_timestamp() {
    let server = ServeProcess::start(&["--log-format", "json"]);
    let addr = server.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let http = HttpClient::new(addr);
        assert_eq!(http.get("/health").await.unwrap().status.as_u16(), 200);
        assert_eq!(http.get("/v1/nothing").await.unwrap().status.as_u16(), 404);
    });
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest}");
    let lines: Vec<serde_json::Value> = rest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "forgeline_server::access")
        .collect();
    let health = lines
        .iter()
        .find(|v| v["fields"]["path"] == "/health")
        .unwrap_or_else(|| panic!("no access line for /health:\n{rest}"));
    // Paths no route answers are logged too.
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["path"] == "/v1/nothing" && v["fields"]["status"] == 404),
        "{rest}"
    );
    assert_eq!(health["fields"]["method"], "GET", "{health}");
    assert_eq!(health["fields"]["status"], 200, "{health}");
    assert_eq!(health["level"], "INFO", "{health}");
    assert!(health["timestamp"].is_string(), "{health}");
    assert!(health["fields"]["ms"].is_u64(), "{health}");
}

#[test]
fn ps_shows_what_a_running_server_has_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "sk-forgeline-ps\n").unwrap();
    let server = ServeProcess::start(&["--api-key-file", key_file.to_str().unwrap()]);
    let url = format!("http://{}", server.addr);
    let ps = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_forgeline"))
            .args(["ps", "--url", &url])
            .args(args)
            .output()
            .unwrap()
    };
    let out = ps(&["--api-key-file", key_file.to_str().unwrap(), "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    let m = &v["models"][0];
    assert_eq!(m["name"], "smollm2-135m-instruct", "{v}");
    assert!(m["kv_budget_bytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(m["running"], 0, "{v}");
    let out = ps(&["--api-key-file", key_file.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("MODEL") && table.contains("smollm2-135m-instruct"),
        "{table}"
    );
    // Without the key the server refuses, and ps says so.
    let out = ps(&[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    drop(server);
    // Nobody there: a clear error naming the address.
    let out = ps(&[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&url));
}

#[test]
fn serve_takes_a_host_name_and_its_flags_from_the_environment() {
    let server = ServeProcess::start(&["--host", "localhost"]);
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    drop(server);
    // FORGELINE_HOST is --host: a public address without a key is refused as with the flag.
    // (Under `timeout`: were the variable not read, a loopback server would start and
    // never end.)
    let out = Command::new("timeout")
        .args([
            "60",
            env!("CARGO_BIN_EXE_forgeline"),
            "serve",
            "--port",
            "0",
        ])
        .arg("--models-dir")
        .arg(models_dir())
        .env("FORGELINE_HOST", "0.0.0.0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--api-key-file"), "{stderr}");
}
