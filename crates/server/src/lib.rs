//! forgeline's HTTP API (axum) in front of a shared `LlmClient`: OpenAI-compatible
//! completions, streamed as server-sent events or whole, pipeline jobs, health and
//! Prometheus metrics.
//!
//! Requests are validated at the boundary into typed engine requests; every error is
//! OpenAI-shaped and names the field at fault. The engine's queue bound is the server's: a
//! request past it gets 429 and is not queued. A streamed answer's body owns its engine
//! stream, so a client who disconnects cancels its generation and frees its KV memory.
//! `Server::run` takes a shutdown future: on it the server stops accepting, lets running
//! requests finish within the grace period, then cancels what is left.
//!
//! # Layout
//! - `app`: the shared state and the routes, behind the auth, metrics and body-limit layers.
//! - `auth`: bearer keys compared in constant time; an open server stays on loopback.
//! - `completions`: the two completion endpoints, whole and as SSE.
//! - `error`: OpenAI-style errors and how engine errors map onto them.
//! - `fields`: typed reads of JSON fields whose errors name the field.
//! - `jobs`: pipeline jobs: the bounded job table, their runs, events and routes.
//! - `metrics`: request and stage counters, engine stats, Prometheus text.
//! - `openai`: the JSON of answers, chunks, usage and model lists.
//! - `request`: completion bodies validated into an `ApiRequest`.
//! - `shutdown`: the signal that cancels what is still running after the grace period.
//! - `client`: a small HTTP/1 client for the bench and the tests (streams SSE).
//! - `bench`: `forgeline bench serve`: HTTP against in-process throughput and latency.

pub mod app;
pub mod auth;
pub mod bench;
pub mod client;
pub mod completions;
pub mod error;
pub mod fields;
pub mod jobs;
pub mod metrics;
pub mod openai;
pub mod request;
pub mod shutdown;

use std::future::{Future, IntoFuture};
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

/// What the server knows of a loaded model: its name and context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCard {
    pub name: String,
    pub context_length: usize,
}

impl ModelCard {
    pub fn of(m: &LoadedModel) -> Self {
        Self {
            name: m.info.name.clone(),
            context_length: m.model.config().context_length,
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
    /// After a shutdown signal, how long running requests may take before they are cancelled.
    pub grace_period: Duration,
    /// `max_tokens` for requests that do not give one (capped by the context left).
    pub default_max_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            request_timeout: Some(Duration::from_secs(600)),
            body_limit: 4 << 20,
            grace_period: Duration::from_secs(30),
            default_max_tokens: 1024,
        }
    }
}

/// How long connections get to close after the grace period's cancellation.
const CLOSE_AFTER_CANCEL: Duration = Duration::from_secs(5);

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

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, waits up to the
    /// grace period for running requests, and cancels the rest.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = self.state.config.grace_period;
        let signalled = Arc::new(tokio::sync::Notify::new());
        let notify = signalled.clone();
        let serve = axum::serve(listener, app::router(self.state.clone()))
            .with_graceful_shutdown(async move {
                shutdown.await;
                notify.notify_one();
            })
            .into_future();
        let mut serve = std::pin::pin!(serve);
        tokio::select! {
            r = &mut serve => return r,
            _ = signalled.notified() => {}
        }
        tracing::info!(
            ?grace,
            "shutting down: no new connections; waiting for running requests"
        );
        tokio::select! {
            r = &mut serve => return r,
            _ = tokio::time::sleep(grace) => {}
        }
        tracing::warn!("grace period over: cancelling the requests still running");
        self.trigger.cancel();
        if let Some(jobs) = &self.state.jobs {
            jobs.cancel_all();
        }
        match tokio::time::timeout(CLOSE_AFTER_CANCEL, serve).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open after cancelling; leaving them");
                Ok(())
            }
        }
    }
}
