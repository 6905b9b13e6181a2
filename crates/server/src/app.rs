//! The state every handler shares and the routes: which path goes where, behind which layers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use forgeline_engine::scheduler::LlmClient;
use serde_json::json;

use crate::auth::require_key;
use crate::error::ApiError;
use crate::jobs::{self, Cluster, Jobs};
use crate::metrics::{track, Metrics};
use crate::origin::{check_host, check_origin};
use crate::shutdown::CancelSignal;
use crate::{completions, openai, ModelCard, ServerConfig};

#[derive(Clone)]
pub struct AppState {
    pub client: LlmClient,
    pub models: Arc<[ModelCard]>,
    pub config: Arc<ServerConfig>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancelSignal,
    /// Pipeline jobs, when the server runs them.
    pub jobs: Option<Arc<Jobs>>,
    /// Cluster mode: jobs on NATS JetStream instead of `jobs`.
    pub cluster: Option<Arc<Cluster>>,
    serial: Arc<AtomicU64>,
    /// Set on the shutdown signal: no new work is taken from then on.
    draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(
        client: LlmClient,
        models: Vec<ModelCard>,
        config: ServerConfig,
        metrics: Arc<Metrics>,
        cancel: CancelSignal,
    ) -> Self {
        Self {
            client,
            models: models.into(),
            config: Arc::new(config),
            metrics,
            cancel,
            jobs: None,
            cluster: None,
            serial: Arc::default(),
            draining: Arc::default(),
        }
    }

    /// The shutdown signal came: refuse new work, let running work finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || self.cancel.is_cancelled()
    }

    /// A number unique to this server's life, for response ids.
    pub fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }
}

pub fn router(app: AppState) -> Router {
    let mut api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completion))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .merge(jobs::routes());
    if let Some(key) = app.config.api_key.clone() {
        api = api.route_layer(middleware::from_fn_with_state(key, require_key));
    }
    let mut api = api.route("/health", get(health));
    if app.config.check_host && app.config.api_key.is_none() {
        api = api.layer(middleware::from_fn_with_state(
            Arc::new(app.config.allowed_origins.clone()),
            check_host,
        ));
    }
    api.route_layer(middleware::from_fn_with_state(app.metrics.clone(), track))
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(app.config.body_limit))
        // A refused origin reaches nothing, and a preflight needs no key.
        .layer(middleware::from_fn_with_state(
            Arc::new(app.config.allowed_origins.clone()),
            check_origin,
        ))
        // Outermost: every request is logged, refused or not.
        .layer(middleware::from_fn(crate::metrics::access_log))
        .with_state(app)
}

async fn unknown_path(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no endpoint at `{}`", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    let mut e = ApiError::invalid(format!("`{}` does not take {method}", uri.path()));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e
}

/// Liveness: the process answers and its engine thread takes requests (503 when it has
/// stopped: nothing can be generated until the server is restarted). In cluster mode, also
/// 503 while the node has lost its NATS server: it keeps its running jobs and reconnects,
/// but cannot take or report jobs until the broker is back.
async fn health(State(app): State<AppState>) -> Response {
    if !app.client.is_alive() {
        let mut body = ApiError::unavailable(
            "the engine thread has stopped: no request can run; restart the server",
        )
        .body();
        body["status"] = json!("engine_stopped");
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    if let Some(c) = app.cluster.as_ref().filter(|c| !c.connected()) {
        let mut body = ApiError::unavailable(format!(
            "the cluster's NATS server {} cannot be reached: this node reconnects, and its \
             running jobs wait to report until it is back",
            c.url()
        ))
        .body();
        body["status"] = json!("cluster_disconnected");
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let stats = app.client.stats();
    Json(json!({
        "status": if app.is_draining() { "shutting_down" } else { "ok" },
        "models": app.models.iter().map(|m| &m.name).collect::<Vec<_>>(),
        "waiting": stats.waiting,
        "running": stats.running,
    }))
    .into_response()
}

async fn models(State(app): State<AppState>) -> impl IntoResponse {
    Json(openai::model_list(&app.models))
}

/// What this server runs now, per model (as `forgeline ps` shows it): sequences running
/// and waiting, KV memory used of its budget, decode speed, requests finished; and the
/// pipeline jobs running.
async fn status(State(app): State<AppState>) -> Json<serde_json::Value> {
    let stats = app.client.stats();
    let models: Vec<serde_json::Value> = app
        .models
        .iter()
        .map(|card| {
            let s = stats.models.iter().find(|s| s.model == card.name);
            json!({
                "name": card.name,
                "context_length": card.context_length,
                "running": s.map_or(0, |s| s.running),
                "waiting": s.map_or(0, |s| s.waiting),
                "kv_used_bytes": s.map_or(0, |s| s.kv_used_bytes),
                "kv_budget_bytes": s.map_or(0, |s| s.kv_budget_bytes),
                "tokens_per_s": s.map_or(0.0, |s| s.tokens_per_s),
                "finished": s.map_or(0, |s| s.finished),
            })
        })
        .collect();
    let state = if !app.client.is_alive() {
        "engine_stopped"
    } else if app.cluster.as_ref().is_some_and(|c| !c.connected()) {
        "cluster_disconnected"
    } else if app.is_draining() {
        "shutting_down"
    } else {
        "ok"
    };
    Json(json!({
        "status": state,
        "models": models,
        "jobs_running": running_jobs(&app),
    }))
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let mut text = app.metrics.render(&app.client.stats(), running_jobs(&app));
    if let Some(c) = &app.cluster {
        text.push_str(&c.render_metrics());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// Jobs running on this server (in cluster mode, those this node runs).
fn running_jobs(app: &AppState) -> usize {
    match (&app.cluster, &app.jobs) {
        (Some(c), _) => c.running(),
        (None, Some(j)) => j.running(),
        (None, None) => 0,
    }
}
