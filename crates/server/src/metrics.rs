//! `GET /metrics`: counters the server keeps (requests by endpoint and status, pipeline stage
//! latencies and results), histograms of finished completions (time to first token, latency,
//! queue time, tokens), and the engine's `Stats` at the time of the scrape (with the gauges
//! llm-d's inference gateway reads, under vLLM's names), in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use forgeline_engine::scheduler::{Stats, Usage, BATCH_BUCKETS};
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What the server counts. Shared by `Arc`; jobs record their stages into it, completions
/// their timings (`record_completion`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// (method, route, status) -> requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    stages: Mutex<BTreeMap<String, StageCounts>>,
    jobs: Mutex<BTreeMap<&'static str, u64>>,
    verdicts: Mutex<BTreeMap<&'static str, u64>>,
    completions: Completions,
}

/// Seconds, vLLM's buckets for time to first token; queue time (never longer) uses them too.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Seconds, vLLM's buckets for a request's end-to-end latency.
pub const LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Tokens per request: 1, 2, 5, 10, ... 100 000 (vLLM's 1-2-5 series).
pub const TOKEN_BUCKETS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

/// vLLM's label for the model on its `vllm:` series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelNameLabel {
    model_name: String,
}

type Histograms = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// The histograms of finished completions (one observation per choice), in a
/// `prometheus-client` registry that encodes them.
#[derive(Debug)]
struct Completions {
    registry: Registry,
    ttft: Histograms,
    e2e: Histograms,
    queue: Histograms,
    prompt_tokens: Histograms,
    completion_tokens: Histograms,
}

impl Default for Completions {
    fn default() -> Self {
        let ttft: Histograms = Family::new_with_constructor(|| Histogram::new(TTFT_BUCKETS));
        let e2e: Histograms = Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        let queue: Histograms = Family::new_with_constructor(|| Histogram::new(TTFT_BUCKETS));
        let prompt_tokens: Histograms =
            Family::new_with_constructor(|| Histogram::new(TOKEN_BUCKETS));
        let completion_tokens: Histograms =
            Family::new_with_constructor(|| Histogram::new(TOKEN_BUCKETS));
        let mut registry = Registry::default();
        registry.register(
            "forgeline_request_time_to_first_token_seconds",
            "Completion choices: seconds from submission to the first generated token",
            ttft.clone(),
        );
        registry.register(
            "forgeline_request_e2e_latency_seconds",
            "Completion choices: seconds from the request's arrival to the choice's end",
            e2e.clone(),
        );
        registry.register(
            "forgeline_request_queue_time_seconds",
            "Completion choices: seconds waiting for admission to the running batch",
            queue.clone(),
        );
        registry.register(
            "forgeline_request_prompt_tokens",
            "Completion choices: prompt tokens",
            prompt_tokens.clone(),
        );
        registry.register(
            "forgeline_request_completion_tokens",
            "Completion choices: generated tokens",
            completion_tokens.clone(),
        );
        Self {
            registry,
            ttft,
            e2e,
            queue,
            prompt_tokens,
            completion_tokens,
        }
    }
}

/// One request's clock, started on its arrival: each of its choices records its completion
/// (`finished`) under the request's model.
pub struct RequestTimer {
    metrics: Arc<Metrics>,
    model: String,
    started: Instant,
}

impl RequestTimer {
    pub fn new(metrics: Arc<Metrics>, model: &str, started: Instant) -> Self {
        Self {
            metrics,
            model: model.to_string(),
            started,
        }
    }

    /// A choice finished with `usage`, now.
    pub fn finished(&self, usage: &Usage) {
        self.metrics
            .record_completion(&self.model, usage, self.started.elapsed());
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct StageCounts {
    /// Timed runs.
    runs: u64,
    seconds: f64,
    /// Verdicts.
    passed: u64,
    failed: u64,
}

impl Metrics {
    pub fn record_request(&self, method: &str, route: &str, status: u16) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
    }

    /// One run of a pipeline stage: how long it took and, for stages that judge their
    /// output, whether it passed.
    pub fn record_stage(&self, stage: &str, took: Duration, passed: Option<bool>) {
        self.record_stage_latency(stage, took);
        if let Some(p) = passed {
            self.record_stage_result(stage, p);
        }
    }

    pub fn record_stage_latency(&self, stage: &str, took: Duration) {
        if let Ok(mut s) = self.stages.lock() {
            let c = s.entry(stage.to_string()).or_default();
            c.runs += 1;
            c.seconds += took.as_secs_f64();
        }
    }

    /// A stage's output passed or failed its checks.
    pub fn record_stage_result(&self, stage: &str, passed: bool) {
        if let Ok(mut s) = self.stages.lock() {
            let c = s.entry(stage.to_string()).or_default();
            if passed {
                c.passed += 1;
            } else {
                c.failed += 1;
            }
        }
    }

    /// A job ended in `outcome` (`succeeded`, `failed`, `cancelled`).
    pub fn record_job(&self, outcome: &'static str) {
        if let Ok(mut j) = self.jobs.lock() {
            *j.entry(outcome).or_default() += 1;
        }
    }

    /// A finished job's verdict (`verified`, `consistent`, `unverified`, `failed`).
    pub fn record_verdict(&self, status: &'static str) {
        if let Ok(mut v) = self.verdicts.lock() {
            *v.entry(status).or_default() += 1;
        }
    }

    /// A completion choice of `model` finished: its engine timings and token counts, and
    /// `e2e`, the time since its request arrived.
    pub fn record_completion(&self, model: &str, usage: &Usage, e2e: Duration) {
        let c = &self.completions;
        let l = ModelLabel {
            model: model.to_string(),
        };
        // Zero when no token was generated: there was no first token to time.
        if !usage.time_to_first_token.is_zero() {
            c.ttft
                .get_or_create(&l)
                .observe(usage.time_to_first_token.as_secs_f64());
        }
        c.e2e.get_or_create(&l).observe(e2e.as_secs_f64());
        c.queue
            .get_or_create(&l)
            .observe(usage.queue_time.as_secs_f64());
        c.prompt_tokens
            .get_or_create(&l)
            .observe(usage.prompt_tokens as f64);
        c.completion_tokens
            .get_or_create(&l)
            .observe(usage.completion_tokens as f64);
    }

    /// Everything, with the engine's `stats` and `jobs_active` running jobs.
    pub fn render(&self, stats: &Stats, jobs_active: usize) -> String {
        let mut out = Text::default();
        out.header(
            "forgeline_http_requests_total",
            "counter",
            "HTTP requests by method, route and status",
        );
        if let Ok(r) = self.requests.lock() {
            for ((method, route, status), n) in r.iter() {
                out.sample(
                    "forgeline_http_requests_total",
                    &[
                        ("method", method),
                        ("route", route),
                        ("status", &status.to_string()),
                    ],
                    *n as f64,
                );
            }
        }
        self.render_engine(&mut out, stats);
        self.render_pipeline(&mut out, jobs_active);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out.0, &self.completions.registry);
        let _ = prometheus_text::encode(&mut out.0, &gateway_gauges(stats));
        out.0
    }

    fn render_engine(&self, out: &mut Text, stats: &Stats) {
        type Get = fn(&forgeline_engine::scheduler::ModelSchedulerStats) -> f64;
        let per_model: [(&str, &str, &str, Get); 15] = [
            (
                "forgeline_queue_depth",
                "gauge",
                "requests waiting for admission",
                |m| m.waiting as f64,
            ),
            (
                "forgeline_running_sequences",
                "gauge",
                "sequences in the running batch",
                |m| m.running as f64,
            ),
            (
                "forgeline_prompt_tokens_total",
                "counter",
                "prompt tokens admitted (tokens in)",
                |m| m.prompt_tokens as f64,
            ),
            (
                "forgeline_cached_prompt_tokens_total",
                "counter",
                "prompt tokens served from the prefix cache",
                |m| m.cached_prompt_tokens as f64,
            ),
            (
                "forgeline_completion_tokens_total",
                "counter",
                "tokens generated (tokens out)",
                |m| m.completion_tokens as f64,
            ),
            (
                "forgeline_prefix_cache_hit_ratio",
                "gauge",
                "share of prompt tokens served from the prefix cache",
                |m| m.prefix_hit_rate(),
            ),
            (
                "forgeline_kv_used_bytes",
                "gauge",
                "KV cache memory in use, prefix cache included",
                |m| m.kv_used_bytes as f64,
            ),
            (
                "forgeline_kv_cached_bytes",
                "gauge",
                "KV cache memory held by the prefix cache",
                |m| m.kv_cached_bytes as f64,
            ),
            (
                "forgeline_kv_active_bytes",
                "gauge",
                "KV cache memory sequences hold (what evicting the prefix cache cannot free)",
                |m| m.kv_active_bytes as f64,
            ),
            (
                "forgeline_kv_budget_bytes",
                "gauge",
                "KV cache memory available",
                |m| m.kv_budget_bytes as f64,
            ),
            (
                "forgeline_engine_steps_total",
                "counter",
                "forward passes",
                |m| m.steps as f64,
            ),
            (
                "forgeline_engine_tokens_per_second",
                "gauge",
                "tokens computed per second of forward passes",
                |m| m.tokens_per_s,
            ),
            (
                "forgeline_preemptions_total",
                "counter",
                "sequences preempted to free KV memory",
                |m| m.preemptions as f64,
            ),
            (
                "forgeline_sequences_finished_total",
                "counter",
                "requests finished",
                |m| m.finished as f64,
            ),
            (
                "forgeline_sequences_cancelled_total",
                "counter",
                "requests cancelled by their caller",
                |m| m.cancelled as f64,
            ),
        ];
        for (name, kind, help, get) in per_model {
            out.header(name, kind, help);
            for m in &stats.models {
                out.sample(name, &[("model", &m.model)], get(m));
            }
        }
        // Not a Prometheus histogram: the engine counts passes per bucket, not the sizes' sum.
        let name = "forgeline_batch_size_passes_total";
        out.header(
            name,
            "counter",
            "forward passes by the number of sequences in them (at most `le`)",
        );
        for m in &stats.models {
            for (&le, &n) in BATCH_BUCKETS.iter().zip(&m.batch_histogram) {
                let le = if le == usize::MAX {
                    "+Inf".to_string()
                } else {
                    le.to_string()
                };
                out.sample(name, &[("model", &m.model), ("le", &le)], n as f64);
            }
        }
    }

    fn render_pipeline(&self, out: &mut Text, jobs_active: usize) {
        out.header("forgeline_jobs_active", "gauge", "pipeline jobs running");
        out.sample("forgeline_jobs_active", &[], jobs_active as f64);
        out.header(
            "forgeline_jobs_total",
            "counter",
            "pipeline jobs ended, by outcome",
        );
        if let Ok(j) = self.jobs.lock() {
            for (outcome, n) in j.iter() {
                out.sample("forgeline_jobs_total", &[("outcome", outcome)], *n as f64);
            }
        }
        out.header(
            "forgeline_job_verdicts_total",
            "counter",
            "finished pipeline jobs by verdict: what execution proved about the result",
        );
        if let Ok(v) = self.verdicts.lock() {
            for (status, n) in v.iter() {
                out.sample(
                    "forgeline_job_verdicts_total",
                    &[("status", status)],
                    *n as f64,
                );
            }
        }
        let stages: Vec<(String, StageCounts)> = self
            .stages
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        let name = "forgeline_stage_duration_seconds";
        out.header(name, "summary", "pipeline stage run time");
        for (stage, c) in &stages {
            out.sample(&format!("{name}_sum"), &[("stage", stage)], c.seconds);
            out.sample(&format!("{name}_count"), &[("stage", stage)], c.runs as f64);
        }
        // Only stages that judge their output have verdicts.
        let judged: Vec<_> = stages
            .iter()
            .filter(|(_, c)| c.passed + c.failed > 0)
            .collect();
        let name = "forgeline_stage_results_total";
        out.header(name, "counter", "pipeline stage verdicts by result");
        for (stage, c) in &judged {
            let pass = c.passed as f64;
            out.sample(name, &[("stage", stage), ("result", "pass")], pass);
            let fail = c.failed as f64;
            out.sample(name, &[("stage", stage), ("result", "fail")], fail);
        }
        let name = "forgeline_stage_pass_ratio";
        out.header(name, "gauge", "share of a stage's verdicts that passed");
        for (stage, c) in &judged {
            let ratio = c.passed as f64 / (c.passed + c.failed) as f64;
            out.sample(name, &[("stage", stage)], ratio);
        }
    }
}

/// The gauges llm-d's inference gateway (and other vLLM-aware routers) read, under vLLM's
/// names and its `model_name` label: requests waiting and running, and the share of the KV
/// cache in use, 0 to 1 (prefix cache included), under its old name and its new one.
fn gateway_gauges(stats: &Stats) -> Registry {
    let waiting = Family::<ModelNameLabel, Gauge>::default();
    let running = Family::<ModelNameLabel, Gauge>::default();
    let kv = Family::<ModelNameLabel, Gauge<f64, AtomicU64>>::default();
    for m in &stats.models {
        let l = ModelNameLabel {
            model_name: m.model.clone(),
        };
        waiting.get_or_create(&l).set(m.waiting as i64);
        running.get_or_create(&l).set(m.running as i64);
        let usage = if m.kv_budget_bytes == 0 {
            0.0
        } else {
            (m.kv_active_bytes as f64 / m.kv_budget_bytes as f64).clamp(0.0, 1.0)
        };
        kv.get_or_create(&l).set(usage);
    }
    let mut r = Registry::default();
    r.register(
        "vllm:num_requests_waiting",
        "Requests waiting for admission (forgeline_queue_depth, under vLLM's name)",
        waiting,
    );
    r.register(
        "vllm:num_requests_running",
        "Sequences in the running batch (forgeline_running_sequences, under vLLM's name)",
        running,
    );
    r.register(
        "vllm:gpu_cache_usage_perc",
        "KV cache usage, 0 to 1: memory sequences hold (blocks only the prefix cache keeps count as free, as in vLLM) over forgeline_kv_budget_bytes",
        kv.clone(),
    );
    r.register(
        "vllm:kv_cache_usage_perc",
        "KV cache usage, 0 to 1 (vllm:gpu_cache_usage_perc under vLLM's newer name)",
        kv,
    );
    r
}

/// Prometheus' text exposition format.
#[derive(Default)]
struct Text(String);

impl Text {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Middleware: counts each request under its route (unmatched paths never reach it, so the
/// label set stays bounded).
pub async fn track(
    State(metrics): State<std::sync::Arc<Metrics>>,
    path: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().to_string();
    let route = path
        .as_ref()
        .map(MatchedPath::as_str)
        .unwrap_or("other")
        .to_string();
    let r = next.run(req).await;
    metrics.record_request(&method, &route, r.status().as_u16());
    r
}

/// Middleware, outermost: one access-log line per request, whatever answered it (target
/// `forgeline_server::access`, at info): method, path (cut at 200 bytes), status, and the
/// milliseconds until the response's head (a stream's body goes on after it).
pub async fn access_log(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let mut path = req.uri().path().to_string();
    if path.len() > 200 {
        let mut end = 200;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        path.truncate(end);
    }
    let r = next.run(req).await;
    let status = r.status().as_u16();
    tracing::info!(
        target: "forgeline_server::access",
        method = %method,
        path = %path,
        status,
        ms = started.elapsed().as_millis() as u64,
        "{method} {path} {status}"
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgeline_engine::scheduler::ModelSchedulerStats;

    #[test]
    fn renders_requests_engine_stats_and_stages() {
        let m = Metrics::default();
        m.record_request("POST", "/v1/chat/completions", 200);
        m.record_request("POST", "/v1/chat/completions", 200);
        m.record_request("POST", "/v1/chat/completions", 429);
        m.record_stage("planner", Duration::from_millis(500), Some(true));
        m.record_stage("planner", Duration::from_millis(1500), Some(false));
        m.record_stage("collector", Duration::from_millis(5), None);
        m.record_job("succeeded");
        m.record_verdict("unverified");
        let mut model = ModelSchedulerStats::new("tiny \"m\"", 4096);
        model.running = 3;
        model.kv_used_bytes = 1024;
        model.prompt_tokens = 10;
        model.cached_prompt_tokens = 5;
        model.record_step(3, 3, Duration::from_millis(1));
        let stats = Stats {
            waiting: 2,
            running: 3,
            models: vec![model],
        };
        let text = m.render(&stats, 1);
        for line in [
            "forgeline_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"} 2",
            "forgeline_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"429\"} 1",
            "forgeline_running_sequences{model=\"tiny \\\"m\\\"\"} 3",
            "forgeline_kv_used_bytes{model=\"tiny \\\"m\\\"\"} 1024",
            "forgeline_prefix_cache_hit_ratio{model=\"tiny \\\"m\\\"\"} 0.5",
            "forgeline_batch_size_passes_total{model=\"tiny \\\"m\\\"\",le=\"4\"} 1",
            "forgeline_stage_duration_seconds_sum{stage=\"planner\"} 2",
            "forgeline_stage_results_total{stage=\"planner\",result=\"fail\"} 1",
            "forgeline_stage_duration_seconds_count{stage=\"collector\"} 1",
            "forgeline_stage_pass_ratio{stage=\"planner\"} 0.5",
            "forgeline_jobs_active 1",
            "forgeline_jobs_total{outcome=\"succeeded\"} 1",
            "forgeline_job_verdicts_total{status=\"unverified\"} 1",
            "# TYPE forgeline_queue_depth gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        // A stage without verdicts has no pass ratio.
        assert!(!text.contains("forgeline_stage_pass_ratio{stage=\"collector\"}"));
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn completions_fill_histograms_and_the_gateway_reads_vllm_gauges() {
        let m = Metrics::default();
        let usage = |ttft_ms, queue_ms, prompt, completion| Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            queue_time: Duration::from_millis(queue_ms),
            time_to_first_token: Duration::from_millis(ttft_ms),
            ..Usage::default()
        };
        m.record_completion("tiny", &usage(30, 3, 12, 7), Duration::from_millis(400));
        m.record_completion("tiny", &usage(700, 200, 12, 300), Duration::from_secs(4));
        // No token generated: timed end to end, but no first token.
        m.record_completion("other", &usage(0, 1, 5, 0), Duration::from_millis(2));
        let mut model = ModelSchedulerStats::new("tiny", 4096);
        model.waiting = 3;
        model.running = 2;
        model.kv_used_bytes = 2048;
        model.kv_active_bytes = 1024;
        let mut empty = ModelSchedulerStats::new("other", 0);
        empty.kv_used_bytes = 7;
        empty.kv_active_bytes = 7;
        let stats = Stats {
            waiting: 3,
            running: 2,
            models: vec![model, empty],
        };
        let text = m.render(&stats, 0);
        let ttft = "forgeline_request_time_to_first_token_seconds";
        let e2e = "forgeline_request_e2e_latency_seconds";
        let queue = "forgeline_request_queue_time_seconds";
        let tokens = "forgeline_request_completion_tokens";
        for (series, want) in [
            (format!("{ttft}_bucket{{model=\"tiny\",le=\"0.02\"}}"), 0.0),
            (format!("{ttft}_bucket{{model=\"tiny\",le=\"0.04\"}}"), 1.0),
            (format!("{ttft}_bucket{{model=\"tiny\",le=\"0.75\"}}"), 2.0),
            (format!("{ttft}_bucket{{model=\"tiny\",le=\"+Inf\"}}"), 2.0),
            (format!("{ttft}_count{{model=\"tiny\"}}"), 2.0),
            (format!("{e2e}_bucket{{model=\"tiny\",le=\"0.3\"}}"), 0.0),
            (format!("{e2e}_bucket{{model=\"tiny\",le=\"0.5\"}}"), 1.0),
            (format!("{e2e}_bucket{{model=\"tiny\",le=\"5\"}}"), 2.0),
            (format!("{e2e}_count{{model=\"tiny\"}}"), 2.0),
            (format!("{e2e}_sum{{model=\"tiny\"}}"), 4.4),
            (format!("{e2e}_count{{model=\"other\"}}"), 1.0),
            (
                format!("{queue}_bucket{{model=\"tiny\",le=\"0.005\"}}"),
                1.0,
            ),
            (format!("{queue}_count{{model=\"other\"}}"), 1.0),
            (format!("{tokens}_bucket{{model=\"tiny\",le=\"10\"}}"), 1.0),
            (format!("{tokens}_bucket{{model=\"tiny\",le=\"500\"}}"), 2.0),
            (format!("{tokens}_sum{{model=\"tiny\"}}"), 307.0),
            (
                "forgeline_request_prompt_tokens_sum{model=\"tiny\"}".into(),
                24.0,
            ),
            ("vllm:num_requests_waiting{model_name=\"tiny\"}".into(), 3.0),
            ("vllm:num_requests_running{model_name=\"tiny\"}".into(), 2.0),
            (
                "vllm:gpu_cache_usage_perc{model_name=\"tiny\"}".into(),
                0.25,
            ),
            ("vllm:kv_cache_usage_perc{model_name=\"tiny\"}".into(), 0.25),
            // No budget: no usage to speak of, and no division by zero.
            (
                "vllm:gpu_cache_usage_perc{model_name=\"other\"}".into(),
                0.0,
            ),
        ] {
            let got = value(&text, &series);
            assert!(
                got.is_some_and(|v| (v - want).abs() < 1e-9),
                "`{series}` is {got:?}, not {want}, in\n{text}"
            );
        }
        for line in [
            format!("# TYPE {ttft} histogram"),
            format!("# TYPE {tokens} histogram"),
            "# TYPE vllm:gpu_cache_usage_perc gauge".into(),
            "# TYPE vllm:num_requests_waiting gauge".into(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // A choice without a first token has none timed.
        assert_eq!(
            value(&text, &format!("{ttft}_count{{model=\"other\"}}")),
            None
        );
        // The hand-written series are still there, once each.
        assert_eq!(
            text.matches("# TYPE forgeline_queue_depth gauge").count(),
            1
        );
        assert_eq!(
            value(&text, "forgeline_queue_depth{model=\"tiny\"}"),
            Some(3.0)
        );
    }
}
