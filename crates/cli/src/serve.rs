//! `forgeline serve`: loads the models, starts the engine, the sandbox and the pipeline, and
//! serves the HTTP API until SIGTERM or Ctrl-C.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use forgeline_engine::loader::LoadedModel;
use forgeline_engine::scheduler::{LlmClient, SchedulerConfig};
use forgeline_pipeline::{Pipeline, PipelineConfig, Prompts};
use forgeline_sandbox::{Sandbox, SandboxConfig};
use forgeline_server::jobs::store::parse_age;
use forgeline_server::jobs::{
    Cluster, ClusterConfig, ClusterError, FileStore, JobStore, Retention,
};
use forgeline_server::{
    check_exposure, AllowedOrigins, ApiKey, JobLimits, ModelCard, Server, ServerConfig,
};

use crate::pipeline_setup::PipelineArgs;
use crate::Env;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; other than loopback only with --api-key-file (or --insecure-no-auth)
    #[arg(long, default_value = "127.0.0.1", env = "FORGELINE_HOST")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed at start-up)
    #[arg(long, default_value_t = 8080, env = "FORGELINE_PORT")]
    pub port: u16,
    /// Model to serve (repeatable; the first is the default) [default: smollm2-135m-instruct]
    #[arg(long = "model", env = "FORGELINE_MODEL", value_delimiter = ',')]
    pub models: Vec<String>,
    /// File holding the API key clients must send as `Authorization: Bearer <key>`
    #[arg(long, env = "FORGELINE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Serve without authentication on a non-loopback address
    #[arg(long, env = "FORGELINE_INSECURE_NO_AUTH", value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure_no_auth: bool,
    /// Requests waiting for the engine beyond which new ones get 429
    #[arg(long, default_value_t = 256, env = "FORGELINE_MAX_WAITING")]
    pub max_waiting: usize,
    /// Seconds a generation may take from submission (0: no limit)
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=31_536_000), env = "FORGELINE_REQUEST_TIMEOUT")]
    pub request_timeout: u64,
    /// Largest request body, in bytes
    #[arg(long, default_value_t = 4 << 20, env = "FORGELINE_BODY_LIMIT")]
    pub body_limit: usize,
    /// Seconds running requests and jobs get to finish after SIGTERM or Ctrl-C
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=31_536_000), env = "FORGELINE_GRACE_PERIOD")]
    pub grace_period: u64,
    /// `max_tokens` of requests that give none (capped by the context left)
    #[arg(long, default_value_t = 1024, env = "FORGELINE_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: usize,
    /// Pipeline config for jobs (per-stage models, sampling, limits) [default: ./forgeline.toml if present]
    #[arg(long, env = "FORGELINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of stage templates (`<stage>.j2`) that replace the built-in ones
    #[arg(long, env = "FORGELINE_PROMPTS")]
    pub prompts: Option<PathBuf>,
    /// Pipeline jobs running at once; more get 429
    #[arg(long, default_value_t = 4, env = "FORGELINE_MAX_JOBS")]
    pub max_jobs: usize,
    /// Jobs kept for `GET /v1/jobs/{id}` (those that ended first go first)
    #[arg(long, default_value_t = 256, env = "FORGELINE_JOBS_KEPT")]
    pub jobs_kept: usize,
    /// Where forgeline keeps its data; jobs (requests, states, events, results) are kept under its jobs/, across restarts [default: $XDG_DATA_HOME/forgeline, else ~/.local/share/forgeline]
    #[arg(long, env = "FORGELINE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// How long finished jobs are kept: seconds, or a number with s, m, h, d or w (90m, 7d); 0 keeps them however old
    #[arg(long, default_value = "7d", env = "FORGELINE_KEEP_JOBS_FOR")]
    pub keep_jobs_for: String,
    /// Megabytes the stored jobs may take; past it, those that ended first go (0: no bound)
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=1 << 40), env = "FORGELINE_JOBS_STORE_MAX_MB")]
    pub jobs_store_max_mb: u64,
    /// Serve the OpenAI-compatible API only, without pipeline jobs
    #[arg(long, env = "FORGELINE_NO_JOBS", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_jobs: bool,
    /// Run pipeline jobs on a cluster: every node given the same NATS server (with JetStream) shares one queue of jobs, each run by a node with room; jobs are kept on the broker, not in --data-dir
    #[arg(long, value_name = "nats://HOST:PORT", env = "FORGELINE_CLUSTER")]
    pub cluster: Option<String>,
    /// Seconds the broker waits for a running job's heartbeat (sent every third of it) before giving the job to another node
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600), env = "FORGELINE_CLUSTER_ACK_WAIT")]
    pub cluster_ack_wait: u64,
    /// This node's name in the cluster, shown in the jobs it runs [default: HOSTNAME-PID]
    #[arg(long, env = "FORGELINE_CLUSTER_NODE")]
    pub cluster_node: Option<String>,
    /// Connections served at once; further clients wait until one closes
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65_536), env = "FORGELINE_MAX_CONNECTIONS")]
    pub max_connections: u64,
    /// Seconds a client gets to send a request's headers (also how long an idle keep-alive connection stays open)
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400), env = "FORGELINE_HEADER_TIMEOUT")]
    pub header_timeout: u64,
    /// Seconds the server waits on a client that stopped sending its body (408) or reading its answer (closed)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400), env = "FORGELINE_IDLE_TIMEOUT")]
    pub idle_timeout: u64,
    /// Origin (scheme://host[:port], or *) whose web pages may call the API (repeatable); other origins get 403
    #[arg(
        long = "allowed-origin",
        env = "FORGELINE_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
}

/// `--host`: an IP address, or a name (`localhost`, one in /etc/hosts) as the system
/// resolves it; `localhost` is 127.0.0.1.
fn listen_address(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    use std::net::ToSocketAddrs;
    (host, 0)
        .to_socket_addrs()
        .map_err(|e| {
            format!("--host `{host}`: not an IP address, and the name does not resolve: {e}")
        })?
        .map(|a| a.ip())
        .next()
        .ok_or_else(|| format!("--host `{host}`: the name has no address"))
}

pub fn run(a: ServeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let host = listen_address(&a.host).map_err(crate::usage)?;
    let api_key = match &a.api_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| crate::usage(format!("--api-key-file {}: {e}", path.display())))?;
            let key = ApiKey::new(&text)
                .map_err(|e| crate::usage(format!("--api-key-file {}: {e}", path.display())))?;
            Some(key)
        }
        None => None,
    };
    check_exposure(host, api_key.is_some(), a.insecure_no_auth).map_err(crate::usage)?;
    if a.max_waiting == 0 || a.body_limit == 0 || a.default_max_tokens == 0 {
        return Err(crate::usage(
            "--max-waiting, --body-limit and --default-max-tokens must be at least 1",
        ));
    }

    let allowed_origins = AllowedOrigins::parse(&a.allowed_origins)
        .map_err(|e| crate::usage(format!("--allowed-origin: {e}")))?;
    let retention = Retention {
        keep_for: parse_age(&a.keep_jobs_for)
            .map_err(|e| crate::usage(format!("--keep-jobs-for {e}")))?,
        max_bytes: (a.jobs_store_max_mb > 0).then_some(a.jobs_store_max_mb << 20),
    };
    let rt = crate::runtime()?;
    // Joined before the models load: a broker that cannot be used fails at once.
    let cluster = match (&a.cluster, a.no_jobs) {
        (Some(url), false) => Some(rt.block_on(join_cluster(url, &a, &retention))?),
        _ => None,
    };
    // Opened before the models load: a data directory another server holds fails at once.
    let store = if a.no_jobs || cluster.is_some() {
        None
    } else {
        Some(open_store(a.data_dir.as_deref())?)
    };

    let mut pipeline_config = PipelineArgs {
        model: None,
        config: a.config.clone(),
        prompts: a.prompts.clone(),
    }
    .config_for(env, a.models.first().map(String::as_str))?;
    let prompts = Prompts::load(a.prompts.as_deref()).map_err(|e| crate::usage(e.to_string()))?;
    let loaded = load_models(&a.models, &mut pipeline_config, env)?;
    let cards: Vec<ModelCard> = loaded.iter().map(ModelCard::of).collect();
    let client = LlmClient::start(
        loaded,
        SchedulerConfig {
            max_waiting: a.max_waiting,
            ..env.scheduler()
        },
    )?;
    let config = ServerConfig {
        api_key: api_key.clone(),
        request_timeout: (a.request_timeout > 0).then(|| Duration::from_secs(a.request_timeout)),
        body_limit: a.body_limit,
        grace_period: Duration::from_secs(a.grace_period),
        default_max_tokens: a.default_max_tokens,
        header_timeout: Duration::from_secs(a.header_timeout),
        idle_timeout: Duration::from_secs(a.idle_timeout),
        max_connections: usize::try_from(a.max_connections).unwrap_or(usize::MAX),
        allowed_origins,
        // Against DNS rebinding; a keyless server on another address was opened on purpose
        // (--insecure-no-auth), and its clients may well use its name.
        check_host: host.is_loopback(),
    };
    let jobs = JobLimits {
        max_running: a.max_jobs.max(1),
        max_kept: a.jobs_kept.max(1),
    };

    let grace = Duration::from_secs(a.grace_period);
    rt.block_on(async move {
        let mut server = Server::new(client.clone(), cards.clone(), config);
        let mut running_cluster = None;
        if !a.no_jobs {
            // The OpenAI API is useful without jobs: a missing Python only disables them.
            match Sandbox::new(SandboxConfig::default()).await {
                Ok(sandbox) => {
                    let llm = Arc::new(client);
                    let pipeline = Pipeline::new(llm, sandbox, prompts, pipeline_config);
                    if let Some(joined) = cluster {
                        let url = joined.url().to_string();
                        let c = joined
                            .start(Arc::new(pipeline), server.metrics())
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        eprintln!(
                            "forgeline serve: cluster {url}: node {} takes up to {} jobs at once from its queue",
                            c.node(),
                            jobs.max_running
                        );
                        running_cluster = Some(c.clone());
                        server = server.with_cluster(c);
                    } else {
                        let store = store.expect("opened unless --no-jobs or --cluster");
                        let dir = store.describe();
                        let (s, restored) = server
                            .with_stored_jobs(pipeline, jobs, store, retention)
                            .map_err(|e| crate::usage(format!("job store {dir}: {e}")))?;
                        server = s;
                        eprintln!(
                            "forgeline serve: jobs kept in {dir} ({} finished, {} running again{}{}{})",
                            restored.finished,
                            restored.requeued,
                            plural_note(restored.failed, "ended as failed instead"),
                            plural_note(restored.removed, "removed by retention"),
                            plural_note(restored.skipped, "unreadable, skipped"),
                        );
                    }
                }
                Err(e) => eprintln!("forgeline serve: pipeline jobs disabled: {e}"),
            }
        }
        let shutdown = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, a.port))
            .await
            .map_err(|e| crate::usage(format!("cannot listen on {host}:{}: {e}", a.port)))?;
        let addr = listener.local_addr()?;
        let names: Vec<&str> = cards.iter().map(|c| c.name.as_str()).collect();
        eprintln!(
            "forgeline serve: listening on http://{addr} (models: {})",
            names.join(", ")
        );
        match (&api_key, host.is_loopback()) {
            (Some(_), _) => eprintln!("forgeline serve: clients must send the API key as a bearer token"),
            (None, true) => eprintln!(
                "forgeline serve: no --api-key-file, so only this machine can connect ({host}); \
                 give a key to serve other hosts"
            ),
            (None, false) => eprintln!(
                "forgeline serve: WARNING: no authentication, and {host} is reachable from other hosts"
            ),
        }
        let stopped = server.run(listener, shutdown).await?;
        if let Some(c) = running_cluster {
            let (finished, handed_back) = c.stop(grace).await;
            eprintln!(
                "forgeline serve: left the cluster ({finished} running jobs finished in the grace \
                 period, {handed_back} handed back to the queue)"
            );
        }
        let mut cut = Vec::new();
        if stopped.jobs_cancelled > 0 {
            cut.push(format!("{} jobs cancelled", stopped.jobs_cancelled));
        }
        if stopped.connections_cancelled > 0 {
            cut.push(format!("{} requests cancelled", stopped.connections_cancelled));
        }
        eprintln!(
            "forgeline serve: stopped ({} running jobs finished in the grace period{}{})",
            stopped.jobs_finished,
            if cut.is_empty() { "" } else { "; " },
            cut.join(", ")
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// Connects to `--cluster`'s broker and sets up its streams, consumer and bucket: a bad URL
/// is bad usage (2); a broker that cannot be reached or has no JetStream, a runtime failure
/// (3). Either way the message names the URL.
async fn join_cluster(
    url: &str,
    a: &ServeArgs,
    retention: &Retention,
) -> anyhow::Result<forgeline_server::jobs::cluster::Joined> {
    let node = a.cluster_node.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".into());
        format!("{host}-{}", std::process::id())
    });
    let config = ClusterConfig {
        url: url.to_string(),
        node,
        max_running: a.max_jobs.max(1),
        ack_wait: Duration::from_secs(a.cluster_ack_wait),
        retention: *retention,
    };
    Cluster::connect(config).await.map_err(|e| match e {
        ClusterError::BadUrl(..) => crate::usage(e.to_string()),
        e => anyhow::anyhow!("{e}"),
    })
}

/// `, N what` when N is not 0.
fn plural_note(n: usize, what: &str) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", {n} {what}")
    }
}

/// `--data-dir` when given, else `$XDG_DATA_HOME/forgeline` (an absolute one), else
/// `~/.local/share/forgeline`.
fn data_dir(
    flag: Option<&Path>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(d) = flag {
        return Ok(d.to_path_buf());
    }
    if let Some(x) = xdg.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return Ok(x.join("forgeline"));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/forgeline")),
        None => Err(
            "no --data-dir (FORGELINE_DATA_DIR), and neither XDG_DATA_HOME nor HOME is set to \
             find a default; give --data-dir, or --no-jobs"
                .into(),
        ),
    }
}

/// The job store in the data directory's `jobs/`, locked for this server.
fn open_store(flag: Option<&Path>) -> anyhow::Result<Arc<dyn JobStore>> {
    let dir = data_dir(
        flag,
        std::env::var_os("XDG_DATA_HOME"),
        std::env::var_os("HOME"),
    )
    .map_err(crate::usage)?;
    let store = FileStore::open(dir.join("jobs"))
        .map_err(|e| crate::usage(format!("--data-dir {}: {e}", dir.display())))?;
    Ok(Arc::new(store))
}

/// Loads the models to serve (the default one when none is named) and those the pipeline
/// config names for its stages; a stage model given as a path or repo id is renamed to the
/// loaded model's name, which is what stages call it by.
fn load_models(
    served: &[String],
    cfg: &mut PipelineConfig,
    env: &Env,
) -> anyhow::Result<Vec<LoadedModel>> {
    let mut specs: Vec<Option<String>> = if served.is_empty() {
        vec![None]
    } else {
        served.iter().cloned().map(Some).collect()
    };
    for s in cfg.stages.values() {
        for m in &s.models {
            if !specs.contains(&Some(m.clone())) {
                specs.push(Some(m.clone()));
            }
        }
    }
    let mut loaded: Vec<LoadedModel> = Vec::new();
    for spec in &specs {
        let m = env.load_model(spec.as_deref())?;
        if let Some(spec) = spec {
            for s in cfg.stages.values_mut() {
                for x in s.models.iter_mut().filter(|x| *x == spec) {
                    *x = m.info.name.clone();
                }
            }
        }
        if !loaded.iter().any(|x| x.info.name == m.info.name) {
            loaded.push(m);
        }
    }
    Ok(loaded)
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed now, before the server says it
/// is listening, so that a signal sent right after start-up is not lost.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("forgeline serve: shutting down; running requests get their grace period");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_addresses_or_names() {
        assert_eq!(
            listen_address("localhost").unwrap().to_string(),
            "127.0.0.1"
        );
        assert_eq!(listen_address("::1").unwrap().to_string(), "::1");
        assert_eq!(listen_address("0.0.0.0").unwrap().to_string(), "0.0.0.0");
    }

    #[test]
    fn the_data_dir_is_the_flag_else_the_xdg_data_home_else_under_home() {
        let os = |s: &str| Some(OsString::from(s));
        let flag = Path::new("/srv/fl");
        assert_eq!(data_dir(Some(flag), os("/x"), os("/home/u")).unwrap(), flag);
        assert_eq!(
            data_dir(None, os("/x"), os("/home/u")).unwrap(),
            Path::new("/x/forgeline")
        );
        // A relative XDG_DATA_HOME is not one (the XDG spec says to ignore it).
        assert_eq!(
            data_dir(None, os("rel"), os("/home/u")).unwrap(),
            Path::new("/home/u/.local/share/forgeline")
        );
        assert_eq!(
            data_dir(None, None, os("/home/u")).unwrap(),
            Path::new("/home/u/.local/share/forgeline")
        );
        assert!(data_dir(None, None, None)
            .unwrap_err()
            .contains("--data-dir"));
    }
}
