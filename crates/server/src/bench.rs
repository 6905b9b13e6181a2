//! `forgeline bench serve`: the same streaming workload through HTTP (a server started in
//! process on 127.0.0.1:0, N concurrent clients) and straight through the `LlmClient`, to
//! measure what HTTP costs: throughput, time to first token, latency, and `http_overhead`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgeline_engine::chat::ChatMessage;
use forgeline_engine::scheduler::{Event, GenerateRequest, LlmClient};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::client::HttpClient;
use crate::{ModelCard, Server, ServerConfig};

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Concurrent streaming clients.
    pub clients: usize,
    /// Requests per pass, shared among the clients.
    pub requests: usize,
    /// Tokens per answer (end-of-sequence ignored, so every answer has exactly this many).
    pub max_tokens: usize,
    /// Passes of each kind, alternating which goes first.
    pub rounds: usize,
    /// Also compare one request for this many choices (`n`) with as many separate requests
    /// sent at once, on one long prompt; 0 skips it.
    pub choices: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `xs`, in milliseconds.
    fn of(xs: &mut [Duration]) -> Self {
        xs.sort();
        let at = |p: f64| {
            if xs.is_empty() {
                return 0.0;
            }
            let rank = ((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
            xs[rank - 1].as_secs_f64() * 1e3
        };
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// One way of running the workload, over all rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassReport {
    pub requests: usize,
    pub completion_tokens: usize,
    pub wall_s: f64,
    /// Completion tokens per second of wall time.
    pub throughput_tok_s: f64,
    pub ttft_ms: Percentiles,
    pub latency_ms: Percentiles,
    /// Process CPU time per completion token (engine and HTTP both), in milliseconds.
    pub cpu_ms_per_token: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub clients: usize,
    pub requests: usize,
    pub max_tokens: usize,
    pub rounds: usize,
    pub http: PassReport,
    pub inprocess: PassReport,
    /// 1 - http throughput / in-process throughput, over all rounds.
    pub http_overhead: f64,
    /// The same, round by round: how much of it is noise.
    pub http_overhead_by_round: Vec<f64>,
    /// `--choices`: one request with `n` against `n` separate requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<ChoicesReport>,
}

/// One request with `n` choices against `n` separate requests of the same prompt, all sent
/// at once, over HTTP, each kind in every round (alternating which goes first), on prompts
/// no other pass has seen.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChoicesReport {
    pub choices: usize,
    /// Tokens of the prompt every choice continues.
    pub prompt_tokens: usize,
    /// `n` in one request.
    pub shared: ChoicesPass,
    /// `n` requests.
    pub separate: ChoicesPass,
    /// Separate wall time over shared wall time (above 1: one request is faster).
    pub speedup: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChoicesPass {
    pub wall_s: f64,
    pub completion_tokens: usize,
    pub throughput_tok_s: f64,
    /// Prompt tokens the engine computed (not taken from its prefix cache), per pass.
    pub prefilled_tokens_per_pass: f64,
}

/// One request's timings.
struct Sample {
    ttft: Duration,
    latency: Duration,
    tokens: usize,
}

#[derive(Default)]
struct Totals {
    samples: Vec<Sample>,
    wall: Duration,
    /// CPU time of the whole process (engine included) during the pass.
    cpu: Duration,
}

/// CPU time this process has used (user and system), from /proc; zero where unreadable.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces); utime and stime are the 12th and
    // 13th, in clock ticks of 1/100 s.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn overhead(http_tok_s: f64, inprocess_tok_s: f64) -> f64 {
    1.0 - http_tok_s / inprocess_tok_s.max(1e-9)
}

impl Totals {
    fn throughput(&self) -> f64 {
        let tokens: usize = self.samples.iter().map(|s| s.tokens).sum();
        tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn report(self) -> PassReport {
        let tokens: usize = self.samples.iter().map(|s| s.tokens).sum();
        let throughput_tok_s = self.throughput();
        let mut ttft: Vec<Duration> = self.samples.iter().map(|s| s.ttft).collect();
        let mut latency: Vec<Duration> = self.samples.iter().map(|s| s.latency).collect();
        let wall_s = self.wall.as_secs_f64();
        PassReport {
            requests: self.samples.len(),
            completion_tokens: tokens,
            wall_s,
            throughput_tok_s,
            cpu_ms_per_token: self.cpu.as_secs_f64() * 1e3 / tokens.max(1) as f64,
            ttft_ms: Percentiles::of(&mut ttft),
            latency_ms: Percentiles::of(&mut latency),
        }
    }
}

/// The chat of request `i` of pass `tag`: distinct text early on, so that no pass reuses
/// another's cached prompts, and the same length in every pass.
fn messages(tag: &str, i: usize) -> Vec<ChatMessage> {
    vec![ChatMessage::user(format!(
        "[{tag}-{i:04}] Write a Python function that returns the {} largest values of a list.",
        i % 7 + 2
    ))]
}

/// Runs the bench on `model` of `client`.
pub async fn run(
    client: LlmClient,
    model: ModelCard,
    cfg: BenchConfig,
) -> Result<BenchReport, String> {
    if cfg.clients == 0 || cfg.requests == 0 || cfg.max_tokens == 0 {
        return Err("--clients, --requests and --max-tokens must be at least 1".into());
    }
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let config = ServerConfig {
        request_timeout: None,
        ..ServerConfig::default()
    };
    let server = Server::new(client.clone(), vec![model.clone()], config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(listener, async move {
        let _ = stopped.await;
    }));
    let http = HttpClient::new(addr);

    // Warm both paths (threads, allocations, the chat template's cached prefix).
    let workload = |tag: String, clients, requests| Workload {
        model: model.name.clone(),
        tag,
        clients,
        requests,
        max_tokens: cfg.max_tokens,
    };
    http_pass(&http, workload("warm-http".into(), 1, 1)).await?;
    inprocess_pass(&client, workload("warm-local".into(), 1, 1)).await?;

    let (mut h, mut l) = (Totals::default(), Totals::default());
    let mut by_round = Vec::new();
    for round in 0..cfg.rounds.max(1) {
        let run_http = || {
            http_pass(
                &http,
                workload(format!("http{round}"), cfg.clients, cfg.requests),
            )
        };
        let run_local = || {
            inprocess_pass(
                &client,
                workload(format!("local{round}"), cfg.clients, cfg.requests),
            )
        };
        let (a, b) = if round % 2 == 0 {
            let a = run_http().await?;
            (a, run_local().await?)
        } else {
            let b = run_local().await?;
            (run_http().await?, b)
        };
        by_round.push(overhead(a.throughput(), b.throughput()));
        h.samples.extend(a.samples);
        h.wall += a.wall;
        h.cpu += a.cpu;
        l.samples.extend(b.samples);
        l.wall += b.wall;
        l.cpu += b.cpu;
    }
    let choices = if cfg.choices > 0 {
        Some(choices_bench(&client, &http, &model.name, &cfg).await?)
    } else {
        None
    };
    let _ = stop.send(());
    serving
        .await
        .map_err(|e| format!("server task failed: {e}"))?
        .map_err(|e| format!("server failed: {e}"))?;
    let (http, inprocess) = (h.report(), l.report());
    Ok(BenchReport {
        model: model.name,
        clients: cfg.clients,
        requests: cfg.requests,
        max_tokens: cfg.max_tokens,
        rounds: cfg.rounds.max(1),
        http_overhead: overhead(http.throughput_tok_s, inprocess.throughput_tok_s),
        http_overhead_by_round: by_round,
        http,
        inprocess,
        choices,
    })
}

/// A long prompt (a file of code to extend), distinct from `tag`'s first token on.
fn long_prompt(tag: &str) -> Vec<ChatMessage> {
    let mut code = String::new();
    for i in 0..24 {
        code.push_str(&format!(
            "def scale_{i}(values, factor={i}):\n    return [v * factor for v in values]\n\n"
        ));
    }
    vec![ChatMessage::user(format!(
        "[{tag}] Here is a module:\n```python\n{code}```\nWrite one more function like these."
    ))]
}

/// Prompt tokens the engine computed so far (all models), not counting prefix-cache hits.
fn prefilled(client: &LlmClient) -> u64 {
    client
        .stats()
        .models
        .iter()
        .map(|m| m.prompt_tokens.saturating_sub(m.cached_prompt_tokens))
        .sum()
}

async fn choices_bench(
    client: &LlmClient,
    http: &HttpClient,
    model: &str,
    cfg: &BenchConfig,
) -> Result<ChoicesReport, String> {
    let n = cfg.choices;
    let body = |tag: &str, n: usize, seed: usize| {
        json!({
            "model": model, "messages": long_prompt(tag), "n": n, "seed": seed,
            "max_tokens": cfg.max_tokens, "temperature": 1.0, "ignore_eos": true,
        })
    };
    let prompt_tokens = client
        .tokenize(&GenerateRequest::chat(long_prompt("x"), 1))
        .map_err(|e| e.to_string())?
        .len();
    let (mut shared, mut separate) = (ChoicesPass::default(), ChoicesPass::default());
    let rounds = cfg.rounds.max(1);
    for round in 0..rounds {
        for kind in [round % 2, 1 - round % 2] {
            let tag = format!("choices-{kind}-{round}");
            let before = prefilled(client);
            let started = Instant::now();
            let answers: Vec<Value> = if kind == 0 {
                vec![complete(http, &body(&tag, n, 0)).await?]
            } else {
                let bodies: Vec<Value> = (0..n).map(|i| body(&tag, 1, i)).collect();
                let all = bodies.iter().map(|b| complete(http, b));
                futures_util::future::try_join_all(all).await?
            };
            let wall = started.elapsed().as_secs_f64();
            // The engine publishes its figures after the step that finished the requests.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let pass = if kind == 0 {
                &mut shared
            } else {
                &mut separate
            };
            pass.wall_s += wall;
            pass.completion_tokens += answers
                .iter()
                .map(|a| a["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize)
                .sum::<usize>();
            pass.prefilled_tokens_per_pass +=
                prefilled(client).saturating_sub(before) as f64 / rounds as f64;
        }
    }
    for p in [&mut shared, &mut separate] {
        p.throughput_tok_s = p.completion_tokens as f64 / p.wall_s.max(1e-9);
    }
    Ok(ChoicesReport {
        choices: n,
        prompt_tokens,
        speedup: separate.wall_s / shared.wall_s.max(1e-9),
        shared,
        separate,
    })
}

/// A whole (not streamed) completion; its JSON.
async fn complete(http: &HttpClient, body: &Value) -> Result<Value, String> {
    let r = http
        .post_json("/v1/chat/completions", body)
        .await
        .map_err(|e| e.to_string())?;
    if !r.status.is_success() {
        return Err(format!("HTTP {}: {}", r.status, r.text()));
    }
    r.json().map_err(|e| format!("bad answer: {e}"))
}

/// The workload's requests, `clients` at a time: each client takes the next request number
/// and runs `one` on it until none is left.
async fn drive<F, Fut>(w: Workload, one: F) -> Result<Totals, String>
where
    F: Fn(&Workload, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Sample, String>> + Send,
{
    let w = Arc::new(w);
    let next = Arc::new(AtomicUsize::new(0));
    let (started, cpu) = (Instant::now(), process_cpu());
    let workers: Vec<_> = (0..w.clients)
        .map(|_| {
            let (next, one, w) = (next.clone(), one.clone(), w.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= w.requests {
                        break;
                    }
                    out.push(one(&w, i).await?);
                }
                Ok::<_, String>(out)
            })
        })
        .collect();
    let mut totals = Totals::default();
    for w in workers {
        totals
            .samples
            .extend(w.await.map_err(|e| format!("client task failed: {e}"))??);
    }
    totals.wall = started.elapsed();
    totals.cpu = process_cpu().saturating_sub(cpu);
    Ok(totals)
}

/// One pass of the workload: `requests` chat requests (their prompts tagged so that passes do
/// not share cached prefixes), `clients` at a time.
struct Workload {
    model: String,
    tag: String,
    clients: usize,
    requests: usize,
    max_tokens: usize,
}

/// The workload streamed over HTTP.
async fn http_pass(http: &HttpClient, w: Workload) -> Result<Totals, String> {
    let http = http.clone();
    drive(w, move |w, i| {
        let body = json!({
            "model": w.model, "messages": messages(&w.tag, i), "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": w.max_tokens,
            "temperature": 0, "ignore_eos": true,
        });
        let http = http.clone();
        async move { http_request(&http, &body).await }
    })
    .await
}

async fn http_request(http: &HttpClient, body: &Value) -> Result<Sample, String> {
    let sent = Instant::now();
    let mut s = http
        .post_stream("/v1/chat/completions", body)
        .await
        .map_err(|e| e.to_string())?;
    if !s.status.is_success() {
        let status = s.status;
        return Err(format!(
            "HTTP {status}: {}",
            s.rest().await.unwrap_or_default()
        ));
    }
    let (mut ttft, mut tokens) = (None, 0);
    while let Some(data) = s.next_data().await.map_err(|e| e.to_string())? {
        if data == "[DONE]" {
            break;
        }
        let v: Value =
            serde_json::from_str(&data).map_err(|e| format!("bad chunk `{data}`: {e}"))?;
        if let Some(e) = v.get("error") {
            return Err(format!("stream error: {e}"));
        }
        let content = v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or_default();
        if ttft.is_none() && !content.is_empty() {
            ttft = Some(sent.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    Ok(Sample {
        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
        latency: sent.elapsed(),
        tokens,
    })
}

/// The workload straight through the client.
async fn inprocess_pass(client: &LlmClient, w: Workload) -> Result<Totals, String> {
    let client = client.clone();
    drive(w, move |w, i| {
        let mut req = GenerateRequest::chat(messages(&w.tag, i), w.max_tokens);
        req.model = Some(w.model.clone());
        req.ignore_eos = true;
        let client = client.clone();
        async move { inprocess_request(&client, req).await }
    })
    .await
}

async fn inprocess_request(client: &LlmClient, req: GenerateRequest) -> Result<Sample, String> {
    let sent = Instant::now();
    let mut events = client.generate(req).map_err(|e| e.to_string())?;
    let mut ttft = None;
    let tokens = loop {
        match events.next().await {
            Some(Ok(Event::Delta { text, .. })) => {
                if ttft.is_none() && !text.is_empty() {
                    ttft = Some(sent.elapsed());
                }
            }
            Some(Ok(Event::Done { usage, .. })) => break usage.completion_tokens,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the engine stopped".to_string()),
        }
    };
    Ok(Sample {
        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
        latency: sent.elapsed(),
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut xs: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut xs);
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(Percentiles::of(&mut one).p99, 7.0);
        assert_eq!(Percentiles::of(&mut []).p50, 0.0);
    }
}
