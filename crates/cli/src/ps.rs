//! `forgeline ps`: what a running server has loaded and is doing, from its API
//! (`GET /v1/status`): per model, the sequences running and waiting, KV memory used of its
//! budget, decode speed; and the pipeline jobs running.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use forgeline_server::client::HttpClient;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct PsArgs {
    /// The server's address
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A file holding the server's API key, if it has one
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `http://host:port` (the path, if any, is ignored) as the addresses to try, in order
/// (IPv4 first: `localhost` is tried at 127.0.0.1, where `serve` listens by default).
fn addresses(url: &str) -> Result<Vec<SocketAddr>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url `{url}`: only http://HOST:PORT is supported"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let mut all: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| format!("--url `{url}`: {e}"))?
        .collect();
    all.sort_by_key(|a| !a.is_ipv4());
    if all.is_empty() {
        return Err(format!("--url `{url}`: the host has no address"));
    }
    Ok(all)
}

/// How long `ps` waits for a server's answer.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub async fn run(a: PsArgs) -> anyhow::Result<ExitCode> {
    let key = match &a.api_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| crate::usage(format!("--api-key-file {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let mut last_error = String::new();
    let mut answer = None;
    for addr in addresses(&a.url).map_err(crate::usage)? {
        let mut http = HttpClient::new(addr);
        if let Some(k) = &key {
            http = http.with_api_key(k.trim());
        }
        match tokio::time::timeout(TIMEOUT, http.get("/v1/status")).await {
            Ok(Ok(r)) => {
                answer = Some(r);
                break;
            }
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = format!("no answer within {} s", TIMEOUT.as_secs()),
        }
    }
    let r = answer.ok_or_else(|| {
        anyhow::anyhow!("cannot reach a forgeline server at {}: {last_error}", a.url)
    })?;
    if !r.status.is_success() {
        anyhow::bail!(
            "{} answered {}: {}",
            a.url,
            r.status,
            r.text().chars().take(300).collect::<String>()
        );
    }
    let v: Value = r
        .json()
        .map_err(|e| anyhow::anyhow!("{} did not answer as a forgeline server: {e}", a.url))?;
    if a.json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>20} {:>8}",
        "MODEL", "CONTEXT", "RUNNING", "WAITING", "KV USED / BUDGET", "TOK/S"
    );
    for m in v["models"].as_array().into_iter().flatten() {
        let n = |k: &str| m[k].as_u64().unwrap_or(0);
        println!(
            "{:<28} {:>8} {:>8} {:>8} {:>20} {:>8.1}",
            m["name"].as_str().unwrap_or("?"),
            n("context_length"),
            n("running"),
            n("waiting"),
            format!(
                "{} / {}",
                mib(n("kv_used_bytes")),
                mib(n("kv_budget_bytes"))
            ),
            m["tokens_per_s"].as_f64().unwrap_or(0.0),
        );
    }
    eprintln!(
        "server {}: {}, {} pipeline job(s) running",
        a.url,
        v["status"].as_str().unwrap_or("?"),
        v["jobs_running"].as_u64().unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_host_and_port() {
        let one: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(addresses("http://127.0.0.1:8080/v1").unwrap(), [one]);
        assert_eq!(addresses("http://localhost:8080").unwrap()[0], one);
        assert!(addresses("https://127.0.0.1:8080")
            .unwrap_err()
            .contains("http://"));
        assert!(addresses("http://127.0.0.1").is_err());
    }
}
