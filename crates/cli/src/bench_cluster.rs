//! `forgeline bench cluster`: pipeline jobs through `serve --cluster` nodes on one NATS
//! JetStream broker, against the same jobs on one `serve` without a cluster, all in one run.
//!
//! Every node is a real `forgeline serve` child process of this binary on 127.0.0.1 (and the
//! broker a real `nats-server` from PATH, unless `--nats` names one). On one machine the nodes
//! share its cores, so more nodes do not mean more jobs per minute; what the bench reports is
//! what the cluster costs: jobs per minute with 1, 2, 3 ... nodes beside the single server,
//! the broker's time per job (as the nodes count it), the time from submit to start on an
//! idle cluster, and how long a job takes to start again elsewhere after its node is killed.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use forgeline_server::client::HttpClient;
use serde::Serialize;
use serde_json::{json, Value};

use crate::Env;

#[derive(Args, Debug)]
pub struct BenchClusterArgs {
    /// A NATS server with JetStream to use [default: start `nats-server -js` from PATH on
    /// 127.0.0.1, with its files in a temporary directory]
    #[arg(long, value_name = "nats://HOST:PORT")]
    pub nats: Option<String>,
    /// Node counts to measure, one pass each
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub nodes: Vec<usize>,
    /// Jobs per pass, all submitted at once to the first node
    #[arg(long, default_value_t = 6)]
    pub jobs: usize,
    /// Jobs each node (and the single server) runs at once
    #[arg(long, default_value_t = 1)]
    pub max_jobs: usize,
    /// Pipeline config of the jobs (`serve --config`) [default: serve's]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model the nodes serve [default: smollm2-135m-instruct]
    #[arg(long)]
    pub model: Option<String>,
    /// Compute threads of each server (CANDLE_NUM_THREADS) [default: this machine's cores
    /// shared among the pass's nodes, at least 1: nodes on one machine do not fight over
    /// its cores]
    #[arg(long)]
    pub threads_per_node: Option<usize>,
    /// The nodes' `--cluster-ack-wait`: a killed node's job starts again after about this
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub ack_wait: u64,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Pass {
    /// "single" (one `serve`, no cluster) or "cluster".
    mode: &'static str,
    nodes: usize,
    threads_per_node: usize,
    jobs: usize,
    succeeded: usize,
    wall_s: f64,
    jobs_per_minute: f64,
    /// Submit to running, per job of the batch (includes waiting for a free node).
    submit_to_start_s_p50: f64,
    /// One job submitted to idle servers, submit to running (median of three, after a
    /// warm-up job).
    idle_submit_to_start_ms: f64,
    /// The nodes' time waiting on the broker, per job (0 without a cluster).
    broker_ms_per_job: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    jobs: usize,
    max_jobs: usize,
    ack_wait_s: u64,
    passes: Vec<Pass>,
    /// A pass's jobs per minute over the single server's.
    relative_throughput: Vec<(usize, f64)>,
    /// Seconds from killing the node running a job to the job running on another node.
    redelivery_s: Option<f64>,
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// SIGTERM, and up to 60 s to end (a node stops pulling jobs and hands back its own);
    /// then SIGKILL.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `nats-server -js` on a free port of 127.0.0.1, its files in `dir`.
fn start_nats(dir: &std::path::Path) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                crate::usage(
                    "bench cluster: no `nats-server` on PATH to start (apt-get install \
                     nats-server); or give --nats nats://HOST:PORT of one with JetStream",
                )
            } else {
                anyhow!("bench cluster: cannot run nats-server: {e}")
            }
        })?;
    let proc = Proc {
        child,
        name: "nats-server".into(),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("bench cluster: nats-server did not start listening on {addr} in 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((proc, format!("nats://{addr}")))
}

/// How the bench starts its servers.
struct Launcher<'a> {
    a: &'a BenchClusterArgs,
    env: &'a Env,
    exe: PathBuf,
    tmp: &'a std::path::Path,
}

impl Launcher<'_> {
    /// Compute threads per server when `nodes` share this machine.
    fn threads(&self, nodes: usize) -> usize {
        self.a.threads_per_node.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / nodes.max(1)).max(1)
        })
    }

    /// `forgeline serve` on a free port with `threads` compute threads, in the cluster at
    /// `nats` (or alone): the process and its address once it listens.
    fn serve(
        &self,
        name: &str,
        nats: Option<&str>,
        threads: usize,
    ) -> anyhow::Result<(Proc, SocketAddr)> {
        let mut cmd = Command::new(&self.exe);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FORGELINE_")) {
            cmd.env_remove(k);
        }
        cmd.env("CANDLE_NUM_THREADS", threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string());
        cmd.arg("--models-dir")
            .arg(self.env.registry.models_dir())
            .args(["serve", "--port", "0", "--max-jobs"])
            .arg(self.a.max_jobs.to_string())
            .arg("--data-dir")
            .arg(self.tmp.join(name));
        if let Some(m) = &self.a.model {
            cmd.args(["--model", m]);
        }
        if let Some(c) = &self.a.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(url) = nats {
            cmd.args([
                "--cluster",
                url,
                "--cluster-node",
                name,
                "--cluster-ack-wait",
            ])
            .arg(self.a.ack_wait.to_string());
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("bench cluster: cannot run forgeline serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let proc = Proc {
            child,
            name: name.into(),
        };
        let mut lines = BufReader::new(stderr);
        let mut said = String::new();
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line)? == 0 {
                bail!(
                    "bench cluster: node {} stopped before listening:\n{said}",
                    proc.name
                );
            }
            said.push_str(&line);
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("cannot read the address in `{line}`"))?;
                // Keep draining its stderr so that it never blocks on a full pipe.
                std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
                return Ok((proc, addr));
            }
        }
    }
}

/// Every job is the same task: the same work in every pass.
fn task() -> Value {
    json!({
        "task": "Write a Python function add(a, b) that returns the sum of a and b.",
        "tests": "from solution import add\nassert add(2, 3) == 5\n",
        "entry_point": "add",
        "format": "code",
    })
}

async fn submit(http: &HttpClient) -> anyhow::Result<String> {
    let r = http.post_json("/v1/jobs", &task()).await?;
    if r.status.as_u16() != 202 {
        bail!(
            "bench cluster: POST /v1/jobs answered {}: {}",
            r.status,
            r.text()
        );
    }
    let v: Value = r.json()?;
    v["id"]
        .as_str()
        .map(str::to_string)
        .context("a job without an id")
}

async fn job(http: &HttpClient, id: &str) -> anyhow::Result<Value> {
    let r = http.get(&format!("/v1/jobs/{id}")).await?;
    if r.status.as_u16() != 200 {
        bail!(
            "bench cluster: GET /v1/jobs/{id} answered {}: {}",
            r.status,
            r.text()
        );
    }
    Ok(r.json()?)
}

fn ended(v: &Value) -> bool {
    !matches!(v["state"].as_str(), Some("queued" | "running"))
}

/// Sum of a counter over the nodes' `/metrics`.
async fn broker_seconds(nodes: &[HttpClient]) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for h in nodes {
        let text = h.get("/metrics").await?.text();
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix("forgeline_cluster_broker_seconds_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    Ok(sum)
}

/// Submits `jobs` jobs to `http` (at most `window` unfinished at once; None: all at once)
/// and polls them until each has ended (at most `limit`): when each started and ended,
/// counted from the start of the batch, and how it ended.
async fn batch(
    http: &HttpClient,
    jobs: usize,
    window: Option<usize>,
) -> anyhow::Result<Vec<(Option<f64>, f64, Value)>> {
    let limit = Duration::from_secs(3600);
    let t0 = Instant::now();
    let mut ids: Vec<String> = Vec::with_capacity(jobs);
    let mut started: Vec<Option<f64>> = Vec::with_capacity(jobs);
    let mut done: Vec<Option<(f64, Value)>> = Vec::with_capacity(jobs);
    loop {
        let open = |done: &[Option<(f64, Value)>]| done.iter().filter(|d| d.is_none()).count();
        while ids.len() < jobs && window.is_none_or(|w| open(&done) < w) {
            ids.push(submit(http).await?);
            started.push(None);
            done.push(None);
        }
        if ids.len() == jobs && done.iter().all(Option::is_some) {
            break;
        }
        if t0.elapsed() > limit {
            bail!("bench cluster: jobs still unfinished after {limit:?}");
        }
        for (i, id) in ids.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let v = job(http, id).await?;
            let now = t0.elapsed().as_secs_f64();
            if v["state"] != "queued" && started[i].is_none() {
                started[i] = Some(now);
            }
            if ended(&v) {
                done[i] = Some((now, v));
            }
        }
        // Coarse enough that polling (a broker read per job on a cluster) takes no share of
        // the machine the jobs run on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started
        .into_iter()
        .zip(done)
        .map(|(s, d)| {
            let (end, v) = d.unwrap_or_default();
            (s, end, v)
        })
        .collect())
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One pass: an idle submit-to-start (which also warms the servers up), then `jobs` jobs
/// submitted to the first node: all at once to a cluster, which queues them; to the single
/// server (which refuses jobs beyond its `--max-jobs`) as it has room, the batch's clock
/// running from the same start.
async fn pass(
    mode: &'static str,
    nodes: &[HttpClient],
    threads_per_node: usize,
    jobs: usize,
    window: Option<usize>,
) -> anyhow::Result<Pass> {
    let first = &nodes[0];
    // A whole job first: the servers warm up (and the broker's streams, on a cluster).
    batch(first, 1, None).await?;
    // Then, three times, one job on the idle servers, cancelled once it runs.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let id = submit(first).await?;
        loop {
            let v = job(first, &id).await?;
            if v["state"] != "queued" {
                idle.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("bench cluster: a job on idle servers did not start in 600 s: {v}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let r = first.delete(&format!("/v1/jobs/{id}")).await?;
        if r.status.as_u16() != 200 {
            bail!(
                "bench cluster: DELETE /v1/jobs/{id} answered {}: {}",
                r.status,
                r.text()
            );
        }
        while !ended(&job(first, &id).await?) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Until the node has let go of it.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let idle_ms = median(idle);

    let before = broker_seconds(nodes).await?;
    let runs = batch(first, jobs, window).await?;
    let wall = runs.iter().map(|r| r.1).fold(0.0, f64::max);
    let broker = broker_seconds(nodes).await? - before;
    Ok(Pass {
        mode,
        nodes: nodes.len(),
        threads_per_node,
        jobs,
        succeeded: runs.iter().filter(|r| r.2["state"] == "succeeded").count(),
        wall_s: wall,
        jobs_per_minute: jobs as f64 / wall.max(1e-9) * 60.0,
        submit_to_start_s_p50: median(runs.iter().filter_map(|r| r.0).collect()),
        idle_submit_to_start_ms: idle_ms,
        broker_ms_per_job: broker / jobs as f64 * 1e3,
    })
}

/// Two nodes: a job running on one, that node killed: seconds until the job runs elsewhere.
async fn redelivery(l: &Launcher<'_>, nats: &str) -> anyhow::Result<f64> {
    let (p1, a1) = l.serve("redeliver-1", Some(nats), l.threads(2))?;
    let (p2, a2) = l.serve("redeliver-2", Some(nats), l.threads(2))?;
    let h1 = HttpClient::new(a1);
    let id = submit(&h1).await?;
    let t = Instant::now();
    let on = loop {
        let v = job(&h1, &id).await?;
        if v["state"] == "running" {
            break v["node"].as_str().unwrap_or_default().to_string();
        }
        if ended(&v) || t.elapsed() > Duration::from_secs(600) {
            bail!("bench cluster: the redelivery job never ran: {v}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (mut victim, survivor) = if on == p1.name { (p1, a2) } else { (p2, a1) };
    let survivor = HttpClient::new(survivor);
    let _ = victim.child.kill();
    let _ = victim.child.wait();
    let killed = Instant::now();
    loop {
        let v = job(&survivor, &id).await?;
        if v["runs"].as_u64().unwrap_or(0) >= 2 && v["state"] != "queued" {
            let s = killed.elapsed().as_secs_f64();
            // Let it finish, so that the broker holds no job for a later run.
            while !ended(&job(&survivor, &id).await?) && killed.elapsed() < Duration::from_secs(900)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return Ok(s);
        }
        if killed.elapsed() > Duration::from_secs(600) {
            bail!("bench cluster: the killed node's job did not start again: {v}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn run(a: BenchClusterArgs, env: &Env) -> anyhow::Result<ExitCode> {
    if a.jobs == 0 || a.max_jobs == 0 || a.nodes.is_empty() || a.nodes.contains(&0) {
        return Err(crate::usage(
            "--jobs and --max-jobs must be at least 1, and --nodes a list of counts of at least 1",
        ));
    }
    let tmp = tempfile::tempdir()?;
    let (_broker, nats) = match &a.nats {
        Some(url) => (None, url.clone()),
        None => {
            let (p, url) = start_nats(&tmp.path().join("nats"))?;
            (Some(p), url)
        }
    };
    let l = Launcher {
        a: &a,
        env,
        exe: std::env::current_exe().context("cannot find this forgeline binary")?,
        tmp: tmp.path(),
    };
    let say = |m: String| {
        if crate::stderr_is_terminal() {
            eprintln!("bench cluster: {m}");
        }
    };
    let rt = crate::runtime()?;
    let mut passes = Vec::new();

    say(format!(
        "{} jobs on one server without a cluster ...",
        a.jobs
    ));
    {
        let threads = l.threads(1);
        let (p, addr) = l.serve("single", None, threads)?;
        let single = [HttpClient::new(addr)];
        passes.push(rt.block_on(pass("single", &single, threads, a.jobs, Some(a.max_jobs)))?);
        p.stop();
    }
    for &n in &a.nodes {
        say(format!("{} jobs on {n} node(s) at {nats} ...", a.jobs));
        let mut procs = Vec::new();
        let mut https = Vec::new();
        let threads = l.threads(n);
        for i in 0..n {
            let (p, addr) = l.serve(&format!("n{n}-{i}"), Some(&nats), threads)?;
            procs.push(p);
            https.push(HttpClient::new(addr));
        }
        passes.push(rt.block_on(pass("cluster", &https, threads, a.jobs, None))?);
        for p in procs {
            p.stop();
        }
    }
    say("redelivery: a job's node killed ...".into());
    let redelivery_s = Some(rt.block_on(redelivery(&l, &nats))?);

    let base = passes[0].jobs_per_minute;
    let report = Report {
        jobs: a.jobs,
        max_jobs: a.max_jobs,
        ack_wait_s: a.ack_wait,
        relative_throughput: passes[1..]
            .iter()
            .map(|p| (p.nodes, p.jobs_per_minute / base.max(1e-9)))
            .collect(),
        passes,
        redelivery_s,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for p in &report.passes {
        println!(
            "{:<7} {} node(s) x {} thread(s): {:>2}/{} jobs in {:>6.1} s = {:>5.2} jobs/min; submit to start: idle {:>6.1} ms, batch p50 {:>5.1} s; broker {:>6.1} ms/job",
            p.mode,
            p.nodes,
            p.threads_per_node,
            p.succeeded,
            p.jobs,
            p.wall_s,
            p.jobs_per_minute,
            p.idle_submit_to_start_ms,
            p.submit_to_start_s_p50,
            p.broker_ms_per_job
        );
    }
    if let Some(s) = report.redelivery_s {
        println!(
            "redelivery after a node is killed: {s:.1} s (ack wait {} s)",
            a.ack_wait
        );
    }
    Ok(ExitCode::SUCCESS)
}
