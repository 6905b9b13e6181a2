//! `GET /metrics`: counters the server keeps (requests by endpoint and status, pipeline stage
//! latencies and results), and the engine's `Stats` at the time of the scrape, in Prometheus'
//! text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use forgeline_engine::scheduler::{Stats, BATCH_BUCKETS};

/// What the server counts. Shared by `Arc`; jobs record their stages into it.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (method, route, status) -> requests.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    stages: Mutex<BTreeMap<String, StageCounts>>,
    jobs: Mutex<BTreeMap<&'static str, u64>>,
    verdicts: Mutex<BTreeMap<&'static str, u64>>,
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
        out.0
    }

    fn render_engine(&self, out: &mut Text, stats: &Stats) {
        type Get = fn(&forgeline_engine::scheduler::ModelSchedulerStats) -> f64;
        let per_model: [(&str, &str, &str, Get); 14] = [
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
}
