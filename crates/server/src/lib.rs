//! forgeline's HTTP API (axum) in front of a shared `LlmClient`: OpenAI-compatible
//! completions, streamed as server-sent events or whole, pipeline jobs, health and
//! Prometheus metrics.
//!
//! Requests are validated at the boundary into typed engine requests; every error is
//! OpenAI-shaped and names the field at fault. The engine's queue bound is the server's: a
//! request past it gets 429 and is not queued. A streamed answer's body owns its engine
//! stream, so a client who disconnects cancels its generation and frees its KV memory.
//! `Server::run` takes a shutdown future: on it the server stops accepting, lets running
//! requests and jobs finish within the grace period, then cancels what is left.
//!
//! Hostile clients are bounded: a request's head must arrive within the header timeout, a
//! stalled body or unread answer ends after the idle timeout, connections are capped, only
//! JSON bodies are read, cross-origin requests are refused unless allowed, and every client
//! number is range-checked before any arithmetic.
//!
//! # Layout
//! - `app`: the shared state and the routes, behind the origin, auth and metrics layers.
//! - `auth`: bearer keys compared in constant time; an open server stays on loopback.
//! - `body`: JSON bodies only (415 otherwise), within the size limit and the idle timeout.
//! - `conn`: the accept loop: the connection cap, header and idle timeouts, draining.
//! - `completions`: the two completion endpoints, whole and as SSE.
//! - `error`: OpenAI-style errors and how engine errors map onto them.
//! - `fields`: typed reads of JSON fields whose errors name the field.
//! - `jobs`: pipeline jobs: the bounded job table, their runs, events and routes.
//! - `metrics`: request and stage counters, engine stats, Prometheus text.
//! - `openai`: the JSON of answers, chunks, usage and model lists.
//! - `origin`: cross-origin requests refused (403) unless their origin is allowed.
//! - `request`: completion bodies validated into an `ApiRequest`.
//! - `shutdown`: the signal that cancels what is still running after the grace period.
//! - `client`: a small HTTP/1 client for the bench and the tests (streams SSE).
//! - `bench` (feature `bench`): `forgeline bench serve`: HTTP against in-process throughput and latency.

pub mod app;
pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
pub mod body;
pub mod client;
pub mod completions;
pub mod conn;
pub mod error;
pub mod fields;
pub mod jobs;
pub mod metrics;
pub mod openai;
pub mod origin;
pub mod request;
pub mod shutdown;
pub mod tools;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use forgeline_engine::loader::LoadedModel;
use forgeline_engine::scheduler::LlmClient;
use forgeline_pipeline::Pipeline;
use tokio::net::TcpListener;

pub use auth::{check_exposure, ApiKey};
pub use error::ApiError;
pub use jobs::{JobLimits, Jobs};
pub use metrics::Metrics;
pub use origin::AllowedOrigins;

/// What the server knows of a loaded model: its name and context.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCard {
    pub name: String,
    pub context_length: usize,
    /// Its recipe's sampling: what a request that does not set a field gets.
    pub sampling: forgeline_engine::sampling::SamplingDefaults,
}

impl ModelCard {
    pub fn of(m: &LoadedModel) -> Self {
        Self {
            name: m.info.name.clone(),
            context_length: m.model.config().context_length,
            sampling: m.recipe.sampling.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Clients must send it as a bearer token; None serves without authentication.
    pub api_key: Option<ApiKey>,
    /// Longest a generation may take from submission; past it the answer ends, cut short.
    pub request_timeout: Option<Duration>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub body_limit: usize,
    /// After a shutdown signal, how long running requests and jobs may take before they are
    /// cancelled.
    pub grace_period: Duration,
    /// `max_tokens` for requests that do not give one (capped by the context left).
    pub default_max_tokens: usize,
    /// How long a client has to send a request's line and headers, counted from connecting
    /// or from the end of its previous answer (so also how long an idle keep-alive
    /// connection stays open).
    pub header_timeout: Duration,
    /// How long the server waits on a client that has stopped sending its body (408) or
    /// stopped reading its answer (the connection is closed).
    pub idle_timeout: Duration,
    /// Connections served at once; further clients wait to be accepted.
    pub max_connections: usize,
    /// Origins whose web pages may call the API; a request from any other origin gets 403.
    pub allowed_origins: AllowedOrigins,
    /// Refuse (403) requests whose `Host` is a name other than `localhost` (or an allowed
    /// origin's host): a web page that rebinds its own domain to 127.0.0.1 (DNS rebinding)
    /// sends its domain as `Host`, and its same-origin GETs carry no `Origin`. On for a
    /// keyless server; a server with a key needs no such check.
    pub check_host: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            request_timeout: Some(Duration::from_secs(600)),
            body_limit: 4 << 20,
            grace_period: Duration::from_secs(30),
            default_max_tokens: 1024,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
            allowed_origins: AllowedOrigins::default(),
            check_host: true,
        }
    }
}

/// How long connections and jobs get to end after the grace period's cancellation.
const CLOSE_AFTER_CANCEL: Duration = Duration::from_secs(5);

/// What a shutdown left: jobs that ended in the grace period, and what it had to cancel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Jobs that were running at the signal and ended by themselves.
    pub jobs_finished: usize,
    /// Jobs still running when the grace period ended, cancelled.
    pub jobs_cancelled: usize,
    /// Connections still open when the grace period ended, their requests cancelled.
    pub connections_cancelled: usize,
}

pub struct Server {
    state: app::AppState,
    trigger: shutdown::CancelTrigger,
}

impl Server {
    /// A server for `client`'s models (`models` describes them, in the client's order).
    pub fn new(client: LlmClient, models: Vec<ModelCard>, config: ServerConfig) -> Self {
        let (trigger, cancel) = shutdown::cancel_channel();
        let metrics = Arc::new(Metrics::default());
        Self {
            state: app::AppState::new(client, models, config, metrics, cancel),
            trigger,
        }
    }

    /// The counters `/metrics` reports; pipeline code records stage results into it.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// Runs pipeline jobs (`/v1/jobs`) on `pipeline`; without it those endpoints say 404.
    pub fn with_jobs(mut self, pipeline: Pipeline, limits: JobLimits) -> Self {
        let jobs = Jobs::new(pipeline, self.state.metrics.clone(), limits);
        self.state.jobs = Some(Arc::new(jobs));
        self
    }

    /// Runs pipeline jobs on a cluster (`jobs::Cluster`, connected already): `/v1/jobs`
    /// queues them on its broker, and this node runs its share.
    pub fn with_cluster(mut self, cluster: Arc<jobs::Cluster>) -> Self {
        self.state.cluster = Some(cluster);
        self
    }

    /// The job table, when the server runs jobs: it outlives the server's `run`.
    pub fn jobs(&self) -> Option<Arc<Jobs>> {
        self.state.jobs.clone()
    }

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, waits up to the
    /// grace period for running requests and jobs (whether or not anyone watches them), and
    /// cancels the rest.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Stopped> {
        let config = self.state.config.clone();
        let limits = conn::ConnLimits {
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        };
        let router = app::router(self.state.clone());
        let mut conns = conn::accept_until(listener, router, limits, shutdown).await;

        let grace = config.grace_period;
        self.state.drain();
        let jobs = self.state.jobs.clone();
        let running_jobs = jobs.as_ref().map_or(0, |j| j.running());
        tracing::info!(
            ?grace,
            running_jobs,
            "shutting down: no new connections; waiting for running requests and jobs"
        );
        conns.close();
        let everything = async {
            conns.drained().await;
            if let Some(j) = &jobs {
                j.wait_idle().await;
            }
        };
        let mut stopped = Stopped::default();
        if tokio::time::timeout(grace, everything).await.is_err() {
            tracing::warn!("grace period over: cancelling the requests and jobs still running");
            self.trigger.cancel();
            if let Some(j) = &jobs {
                stopped.jobs_cancelled = j.cancel_all();
            }
            stopped.connections_cancelled = conns.open();
            if tokio::time::timeout(CLOSE_AFTER_CANCEL, conns.drained())
                .await
                .is_err()
            {
                tracing::warn!("connections still open after cancelling; closing them");
                conns.abort();
            }
        }
        stopped.jobs_finished = running_jobs.saturating_sub(stopped.jobs_cancelled);
        Ok(stopped)
    }
}
