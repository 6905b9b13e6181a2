//! Cluster mode (`serve --cluster nats://HOST:PORT`): jobs on NATS JetStream, shared by every
//! node that names the same broker. The single-machine job table (`Jobs`) is not used; the
//! routes call this instead when the server has a cluster.
//!
//! ```text
//! stream FORGELINE_JOBS      subject forgeline.jobs, work-queue retention: one message a job
//!                            ({id, created, task, request}); each is removed once acked
//! consumer forgeline-workers the one durable pull consumer every node pulls from, only while
//!                            it has room (--max-jobs); ack wait --cluster-ack-wait
//! stream FORGELINE_EVENTS    subjects forgeline.events.<id>: each job's events, in order, as
//!                            `/events` streams them, ending with its `job.end`
//! bucket forgeline-jobs      state.<id>: the job as last seen (queued, running on a node);
//!                            end.<id>: how it ended, written create-only (the first writer
//!                            wins: a duplicate finisher's result, or a cancel after the end,
//!                            is discarded)
//! subject forgeline.cancel   core NATS, every node subscribes: the id of a job to stop
//! ```
//!
//! A node that takes a job runs the whole pipeline locally (its stages share the node's
//! prefix cache), sends an in-progress ack every third of the ack wait, writes `end.<id>`,
//! publishes `job.end` and acks. A node that dies stops heartbeating, and the broker
//! redelivers the job to another node after the ack wait; that run starts with a
//! `job.requeued` event. A job delivered more than `MAX_RUNS` times ends as failed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forgeline_pipeline::{Format, JobOutcome, TaskRequest};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::AbortHandle;

use super::{error_kind, panic_message, unix_now, JobRunner, StoredRequest, MAX_RUNS};
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;

const JOBS_STREAM: &str = "FORGELINE_JOBS";
const JOBS_SUBJECT: &str = "forgeline.jobs";
const WORKERS: &str = "forgeline-workers";
const EVENTS_STREAM: &str = "FORGELINE_EVENTS";
const EVENTS_PREFIX: &str = "forgeline.events.";
const BUCKET: &str = "forgeline-jobs";
const CANCEL_SUBJECT: &str = "forgeline.cancel";
/// Jobs waiting in the queue beyond which `POST /v1/jobs` is refused (429).
const MAX_QUEUED: i64 = 100_000;

/// How a node joins the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The broker: `nats://HOST:PORT` (a list, comma-separated, for a NATS cluster).
    pub url: String,
    /// This node's name, shown in jobs it runs (`node`); unique per node.
    pub node: String,
    /// Jobs this node runs at once: it pulls a job only while it has room.
    pub max_running: usize,
    /// How long the broker waits for a running job's heartbeat before giving it to another
    /// node. Heartbeats go every third of it.
    pub ack_wait: Duration,
    /// How long finished jobs and their events are kept (None: however old), and how many
    /// bytes the broker may keep for them (None: no bound): the bucket and the events
    /// stream's `max_age` and `max_bytes`, the oldest going first.
    pub retention: super::Retention,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--cluster `{0}`: not a NATS URL: {1}")]
    BadUrl(String, String),
    #[error("--cluster {0}: cannot connect to the NATS server: {1}")]
    Unreachable(String, String),
    #[error("--cluster {0}: the NATS server has no JetStream (start it with -js, or `jetstream {{}}` in its config): {1}")]
    NoJetStream(String, String),
    #[error("--cluster {0}: cannot create or open JetStream's {1}: {2}")]
    Setup(String, &'static str, String),
}

/// A job as the bucket keeps it (`state.<id>` and `end.<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    created: u64,
    task: String,
    /// queued, running, succeeded, failed, cancelled.
    state: String,
    /// The node running it, or that ran it.
    #[serde(default)]
    node: Option<String>,
    /// Deliveries: 1, and one more each time it is given to a node again.
    #[serde(default)]
    runs: u32,
    #[serde(default)]
    finished: Option<u64>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

impl Record {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "job",
            "created": self.created,
            "finished": self.finished,
            "state": self.state,
            "runs": self.runs,
            "node": self.node,
            "task": self.task,
            "result": self.result,
            "output": self.output,
            "error": self.error,
        })
    }

    fn ended(&self, state: &str, node: &str) -> Record {
        Record {
            state: state.into(),
            node: Some(node.into()),
            finished: Some(unix_now()),
            ..self.clone()
        }
    }
}

/// A queued job: the work-queue message.
#[derive(Serialize, Deserialize)]
struct Work {
    id: String,
    created: u64,
    task: String,
    request: StoredRequest,
}

/// A node connected to the broker, its streams, consumer and bucket in place, that runs no
/// job yet.
pub struct Joined {
    url: String,
    config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: kv::Store,
    events: stream::Stream,
    workers: consumer::PullConsumer,
}

impl Joined {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Starts taking jobs, running them on `runner`.
    pub async fn start(
        self,
        runner: Arc<dyn JobRunner>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let token = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u16;
        let cluster = Arc::new(Cluster {
            url: self.url,
            node: self.config.node,
            client: self.client,
            js: self.js,
            kv: self.kv,
            events: self.events,
            workers: self.workers,
            runner,
            metrics,
            max_running: self.config.max_running.max(1),
            ack_wait: self.config.ack_wait,
            running: Mutex::default(),
            run_here: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            broker_nanos: AtomicU64::new(0),
            serial: AtomicU64::new(0),
            token,
            stopping: AtomicBool::new(false),
            ended: watch::channel(0).0,
        });
        let cancels = cluster
            .client
            .subscribe(CANCEL_SUBJECT)
            .await
            .map_err(|e| ClusterError::Unreachable(cluster.url.clone(), nats_err(e)))?;
        tokio::spawn(listen_for_cancels(Arc::downgrade(&cluster), cancels));
        tokio::spawn(pull_jobs(cluster.clone()));
        tokio::spawn(watch_queue(Arc::downgrade(&cluster)));
        Ok(cluster)
    }
}

/// One node's view of the cluster.
pub struct Cluster {
    url: String,
    node: String,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: kv::Store,
    events: stream::Stream,
    workers: consumer::PullConsumer,
    runner: Arc<dyn JobRunner>,
    metrics: Arc<Metrics>,
    max_running: usize,
    ack_wait: Duration,
    /// Jobs running here, to stop on a cancel.
    running: Mutex<HashMap<String, AbortHandle>>,
    /// Jobs this node has run to their end (or to a cancel).
    run_here: AtomicU64,
    /// Jobs waiting in the queue, as last asked (every 2 s).
    queue_depth: AtomicU64,
    /// Time spent waiting on the broker for the jobs' own traffic (queueing, state, events,
    /// results, acks), in nanoseconds: its overhead per job.
    broker_nanos: AtomicU64,
    serial: AtomicU64,
    token: u16,
    /// Set at shutdown: no more jobs are pulled.
    stopping: AtomicBool,
    /// Bumped whenever a job ends here.
    ended: watch::Sender<u64>,
}

fn nats_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Cluster {
    /// Connects to the broker, checks JetStream, and creates (or opens) the streams, the
    /// consumer and the bucket: a clear error naming the URL when any of it fails. Nothing
    /// is pulled until `Joined::start`.
    pub async fn connect(config: ClusterConfig) -> Result<Joined, ClusterError> {
        let url = config.url.clone();
        for one in url.split(',') {
            one.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| ClusterError::BadUrl(url.clone(), nats_err(e)))?;
        }
        let opts = async_nats::ConnectOptions::new()
            .name(format!("forgeline {}", config.node))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)))
            // A broker that went away is tried again for ever, at most 2 s apart.
            .reconnect_delay_callback(|n| Duration::from_millis((250u64 << n.min(3)).min(2000)))
            .event_callback(|ev| async move {
                match ev {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("cluster: lost the NATS server; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("cluster: connected to NATS"),
                    _ => {}
                }
            });
        let client = tokio::time::timeout(Duration::from_secs(10), opts.connect(url.as_str()))
            .await
            .map_err(|_| ClusterError::Unreachable(url.clone(), "timed out after 10 s".into()))?
            .map_err(|e| ClusterError::Unreachable(url.clone(), nats_err(e)))?;
        let js = jetstream::new(client.clone());
        // JetStream reads 0 as no limit on age, -1 as none on size.
        let keep = config.retention.keep_for.unwrap_or(Duration::ZERO);
        // Quarters of the size bound: three for events, which take most of the room, one for
        // the bucket.
        let bytes = |quarters: u64| {
            config.retention.max_bytes.map_or(-1, |b| {
                (b / 4)
                    .saturating_mul(quarters)
                    .clamp(1 << 16, i64::MAX as u64) as i64
            })
        };
        let setup = |what: &'static str| {
            let url = url.clone();
            move |e: String| ClusterError::Setup(url, what, e)
        };
        let jobs = js
            .get_or_create_stream(stream::Config {
                name: JOBS_STREAM.into(),
                subjects: vec![JOBS_SUBJECT.into()],
                retention: stream::RetentionPolicy::WorkQueue,
                max_messages: MAX_QUEUED,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            // The first JetStream request: its failure says JetStream is not there.
            .map_err(|e| ClusterError::NoJetStream(url.clone(), nats_err(e)))?;
        let workers = jobs
            .get_or_create_consumer(
                WORKERS,
                consumer::pull::Config {
                    durable_name: Some(WORKERS.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| setup("consumer forgeline-workers")(nats_err(e)))?;
        let events = retained(
            &js,
            stream::Config {
                name: EVENTS_STREAM.into(),
                subjects: vec![format!("{EVENTS_PREFIX}*")],
                max_age: keep,
                max_bytes: bytes(3),
                ..Default::default()
            },
        )
        .await
        .map_err(setup("stream FORGELINE_EVENTS"))?;
        // The bucket's stream, made as `create_key_value` makes it (which first asks for
        // account details that older servers, 2.9, answer in a shape it cannot read), but
        // at its size bound the oldest entries go (a bucket would refuse new ones).
        retained(
            &js,
            stream::Config {
                name: format!("KV_{BUCKET}"),
                subjects: vec![format!("$KV.{BUCKET}.>")],
                max_messages_per_subject: 1,
                max_age: keep,
                max_bytes: bytes(1),
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::Old,
                num_replicas: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(setup("bucket forgeline-jobs"))?;
        let kv = js
            .get_key_value(BUCKET)
            .await
            .map_err(|e| setup("bucket forgeline-jobs")(nats_err(e)))?;
        Ok(Joined {
            url,
            config,
            client,
            js,
            kv,
            events,
            workers,
        })
    }
}

/// Opens the stream, or creates it, and brings its retention (age, size, discard policy) to
/// `want`'s: the last node started with other retention flags sets them for the cluster.
async fn retained(js: &jetstream::Context, want: stream::Config) -> Result<stream::Stream, String> {
    let mut s = js
        .get_or_create_stream(want.clone())
        .await
        .map_err(nats_err)?;
    let have = s.cached_info().config.clone();
    if (have.max_age, have.max_bytes, have.discard) != (want.max_age, want.max_bytes, want.discard)
    {
        let config = stream::Config {
            max_age: want.max_age,
            max_bytes: want.max_bytes,
            discard: want.discard,
            ..have
        };
        match js.update_stream(config).await {
            Ok(_) => s = js.get_stream(&want.name).await.map_err(nats_err)?,
            Err(e) => tracing::warn!(
                stream = %want.name,
                "cluster: cannot change the stream's retention ({e}); it keeps the one it has"
            ),
        }
    }
    Ok(s)
}

impl Cluster {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn running_map(&self) -> MutexGuard<'_, HashMap<String, AbortHandle>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Jobs running on this node.
    pub fn running(&self) -> usize {
        self.running_map().len()
    }

    /// Whether the node is connected to the broker now (it reconnects by itself when not).
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether a failed call to the broker is worth trying again: the broker is away or did
    /// not answer in time, not refusing the request itself (a message over its size limit,
    /// say, which would fail for ever).
    fn transient(&self, err: &str) -> bool {
        let e = err.to_ascii_lowercase();
        !self.connected()
            || [
                "timed out",
                "timeout",
                "broken pipe",
                "disconnect",
                "no responders",
                "connection",
            ]
            .iter()
            .any(|w| e.contains(w))
    }

    /// Awaits `f`, a call to the broker, counting its time as the broker's overhead.
    async fn timed<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let t = std::time::Instant::now();
        let out = f.await;
        self.broker_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// The cluster's lines for `/metrics`: the queue's depth and this node's share.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP forgeline_cluster_queue_depth Jobs waiting in the cluster's work queue, taken by no node yet.\n\
             # TYPE forgeline_cluster_queue_depth gauge\n\
             forgeline_cluster_queue_depth {}\n\
             # HELP forgeline_cluster_jobs_run_total Jobs this node has run to their end: its share of the cluster's jobs.\n\
             # TYPE forgeline_cluster_jobs_run_total counter\n\
             forgeline_cluster_jobs_run_total {}\n\
             # HELP forgeline_cluster_jobs_running Cluster jobs running on this node.\n\
             # TYPE forgeline_cluster_jobs_running gauge\n\
             forgeline_cluster_jobs_running {}\n\
             # HELP forgeline_cluster_connected 1 while this node is connected to the NATS server, 0 while it reconnects.\n\
             # TYPE forgeline_cluster_connected gauge\n\
             forgeline_cluster_connected {}\n\
             # HELP forgeline_cluster_broker_seconds_total Time this node's jobs spent waiting on the broker (queueing, state, events, results, acks).\n\
             # TYPE forgeline_cluster_broker_seconds_total counter\n\
             forgeline_cluster_broker_seconds_total {}\n",
            self.queue_depth.load(Ordering::Relaxed),
            self.run_here.load(Ordering::Relaxed),
            self.running(),
            u8::from(self.connected()),
            self.broker_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }

    /// Stops pulling jobs, gives those running here up to `grace` to end, then stops them
    /// and hands them back to the queue (another node, or this one restarted, runs them).
    /// How many ended in the grace period and how many were handed back.
    pub async fn stop(&self, grace: Duration) -> (usize, usize) {
        self.stopping.store(true, Ordering::SeqCst);
        let before = self.running();
        let mut ended = self.ended.subscribe();
        let _ = tokio::time::timeout(grace, async {
            while self.running() > 0 {
                if ended.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        let left: Vec<AbortHandle> = self.running_map().values().cloned().collect();
        for a in &left {
            a.abort();
        }
        // Give their tasks a moment to hand the messages back.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.running() > 0 {
                if ended.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        let _ = self.client.flush().await;
        (before.saturating_sub(left.len()), left.len())
    }

    async fn record(&self, key: &str) -> ApiResult<Option<Record>> {
        let got = self.kv.get(key).await.map_err(|e| {
            ApiError::unavailable(format!(
                "the cluster's job store cannot be read ({e}); retry later"
            ))
        })?;
        Ok(got.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// The job as it ended, else as it is.
    async fn find(&self, id: &str) -> ApiResult<Record> {
        if !valid_id(id) {
            return Err(not_found(id));
        }
        if let Some(r) = self.record(&format!("end.{id}")).await? {
            return Ok(r);
        }
        self.record(&format!("state.{id}"))
            .await?
            .ok_or_else(|| not_found(id))
    }

    /// Publishes one of the job's events, trying again (at most 2 s apart) while the broker
    /// cannot take it, until it does or this node stops: events wait, in order, rather than
    /// being lost. `msg_id` names the event once for the stream's duplicate window, so a
    /// try whose acknowledgement was lost does not store it twice.
    async fn publish_event(&self, id: &str, msg_id: &str, ev: &Value) {
        let subject = format!("{EVENTS_PREFIX}{id}");
        let payload = ev.to_string();
        let mut delay = Duration::from_millis(250);
        let mut warned = false;
        loop {
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone().into())
                .message_id(msg_id);
            let sent = self
                .timed(async {
                    match self.js.send_publish(subject.clone(), msg).await {
                        Ok(ack) => ack.await.map(|_| ()).map_err(nats_err),
                        Err(e) => Err(nats_err(e)),
                    }
                })
                .await;
            match sent {
                Ok(()) => {
                    if warned {
                        tracing::info!(job = %id, "cluster: the job's events are published again");
                    }
                    return;
                }
                Err(e) if self.stopping.load(Ordering::SeqCst) => {
                    tracing::warn!(job = %id, "cluster: an event is lost at shutdown: {e}");
                    return;
                }
                // Refused for itself (too large, say): trying again cannot help.
                Err(e) if !self.transient(&e) => {
                    tracing::warn!(job = %id, "cluster: the broker refused an event ({e}); it is left out");
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(job = %id, "cluster: cannot publish an event ({e}); trying again until the broker takes it");
                        warned = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Writes how the job ended, unless it has ended already (true if this wrote it), and
    /// then publishes its `job.end`. With `persist`, a broker that cannot be reached is
    /// tried again (at most 2 s apart) until it answers or this node stops; without, its
    /// error is returned at once.
    async fn end(&self, rec: &Record, persist: bool) -> Result<bool, String> {
        let bytes = serde_json::to_vec(rec).unwrap_or_default();
        let key = format!("end.{}", rec.id);
        let mut delay = Duration::from_millis(250);
        let mut retried = false;
        loop {
            let created = self.timed(self.kv.create(&key, bytes.clone().into())).await;
            let won = match created {
                Ok(_) => true,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // An earlier try of this very write may have landed (its answer lost).
                    retried
                        && matches!(
                            self.record(&key).await,
                            Ok(Some(r)) if r.node == rec.node && r.runs == rec.runs && r.state == rec.state
                        )
                }
                Err(e)
                    if !persist
                        || self.stopping.load(Ordering::SeqCst)
                        || !self.transient(&nats_err(&e)) =>
                {
                    return Err(nats_err(e))
                }
                Err(e) => {
                    if !retried {
                        tracing::warn!(job = %rec.id, "cluster: cannot write the job's end ({e}); trying again until the broker takes it");
                    }
                    retried = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            if won {
                let ev = json!({
                    "object": "job.end",
                    "id": rec.id,
                    "state": rec.state,
                    "error": rec.error,
                });
                self.publish_event(&rec.id, &format!("{}.end", rec.id), &ev)
                    .await;
            }
            return Ok(won);
        }
    }

    /// `POST /v1/jobs`: queues the job for whichever node has room.
    pub async fn submit(&self, task: TaskRequest, format: Format) -> ApiResult<Value> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let id = format!("job-{:x}{:04x}{serial:04x}", now.as_millis(), self.token);
        let rec = Record {
            id: id.clone(),
            created: now.as_secs(),
            task: task.task.chars().take(200).collect(),
            state: "queued".into(),
            node: None,
            runs: 0,
            finished: None,
            result: None,
            output: None,
            error: None,
        };
        let unavailable = |e: String| {
            tracing::error!(job = %id, "cluster: cannot queue a job: {e}");
            ApiError::unavailable(format!("the job could not be queued ({e}); retry later"))
        };
        let state = serde_json::to_vec(&rec).unwrap_or_default();
        self.timed(self.kv.put(format!("state.{id}"), state.into()))
            .await
            .map_err(|e| unavailable(nats_err(e)))?;
        let work = Work {
            id: id.clone(),
            created: rec.created,
            task: rec.task.clone(),
            request: StoredRequest { task, format },
        };
        let payload = serde_json::to_vec(&work).unwrap_or_default();
        let ack = self
            .timed(async {
                match self.js.publish(JOBS_SUBJECT, payload.into()).await {
                    Ok(ack) => ack.await.map_err(nats_err),
                    Err(e) => Err(nats_err(e)),
                }
            })
            .await;
        if let Err(e) = ack {
            let _ = self.kv.purge(format!("state.{id}")).await;
            if e.contains("maximum messages") {
                return Err(ApiError::overloaded(format!(
                    "the cluster's queue is full ({MAX_QUEUED} jobs); retry later"
                )));
            }
            return Err(unavailable(e));
        }
        Ok(rec.to_json())
    }

    /// `DELETE /v1/jobs/{id}`: cancels a queued or running job (wherever it runs), or
    /// removes a finished one. The job as it now is, with `deleted`.
    pub async fn cancel_or_remove(&self, id: &str) -> ApiResult<Value> {
        let rec = self.find(id).await?;
        let mut out = if rec.finished.is_some() {
            // Finished: forget it, its events too.
            let _ = self.kv.purge(format!("end.{id}")).await;
            let _ = self.kv.purge(format!("state.{id}")).await;
            if let Err(e) = self
                .events
                .purge()
                .filter(format!("{EVENTS_PREFIX}{id}"))
                .await
            {
                tracing::warn!(job = %id, "cluster: cannot remove the job's events: {e}");
            }
            let mut v = rec.to_json();
            v["deleted"] = json!(true);
            v
        } else {
            let mut cancelled = rec.ended("cancelled", rec.node.as_deref().unwrap_or(&self.node));
            cancelled.node = rec.node.clone();
            cancelled.error = Some(json!({"message": "the job was cancelled"}));
            let wrote = self.end(&cancelled, false).await.map_err(|e| {
                ApiError::unavailable(format!("the job could not be cancelled ({e}); retry later"))
            })?;
            let now = if wrote {
                self.metrics.record_job("cancelled");
                // Whichever node runs it stops it; a queued one is dropped when it is taken.
                if let Err(e) = self
                    .client
                    .publish(CANCEL_SUBJECT, id.to_string().into())
                    .await
                {
                    tracing::warn!(job = %id, "cluster: cannot send the cancel: {e}");
                }
                cancelled
            } else {
                // It ended meanwhile.
                self.find(id).await?
            };
            let mut v = now.to_json();
            v["deleted"] = json!(false);
            v
        };
        if let Value::Object(o) = &mut out {
            o.entry("deleted").or_insert(json!(false));
        }
        Ok(out)
    }

    /// Runs one delivered job here, heartbeating, and ends it.
    async fn run_one(self: Arc<Self>, msg: jetstream::Message) {
        let runs = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let work: Work = match serde_json::from_slice(&msg.payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cluster: a queued job that is not one ({e}); dropped");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let id = work.id.clone();
        // Ended already: cancelled while queued, or finished by a node that did not ack.
        match self.timed(self.kv.get(format!("end.{id}"))).await {
            Ok(Some(_)) => {
                let _ = msg.double_ack().await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %id, "cluster: cannot read the job's end ({e}); handing it back");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        }
        let base = Record {
            id: id.clone(),
            created: work.created,
            task: work.task.clone(),
            state: "running".into(),
            node: Some(self.node.clone()),
            runs,
            finished: None,
            result: None,
            output: None,
            error: None,
        };
        if runs > MAX_RUNS {
            let mut failed = base.ended("failed", &self.node);
            failed.error = Some(json!({
                "message": format!(
                    "the node running the job stopped during each of its {MAX_RUNS} runs; it is not run again"
                ),
                "type": "server_error",
            }));
            if let Ok(true) = self.end(&failed, true).await {
                self.metrics.record_job("failed");
            }
            let _ = msg.double_ack().await;
            return;
        }
        let state = serde_json::to_vec(&base).unwrap_or_default();
        let _ = self
            .timed(self.kv.put(format!("state.{id}"), state.into()))
            .await;
        if runs > 1 {
            let ev = json!({
                "object": "job.requeued",
                "id": id,
                "run": runs,
                "time": unix_now(),
                "node": self.node,
                "message": format!(
                    "the node running the job stopped or went silent (run {}); it runs again from \
                     the start under the same id on node {}",
                    runs - 1,
                    self.node
                ),
            });
            self.publish_event(&id, &format!("{id}.{runs}.requeued"), &ev)
                .await;
        }

        let (tx, mut rx) = mpsc::unbounded_channel();
        let run = tokio::spawn(self.runner.run(work.request.task, work.request.format, tx));
        self.running_map().insert(id.clone(), run.abort_handle());
        let mut run = std::pin::pin!(run);
        let mut sent = 0u64;
        let mut beat = tokio::time::interval((self.ack_wait / 3).max(Duration::from_millis(200)));
        beat.tick().await;
        let outcome = loop {
            tokio::select! {
                biased;
                r = &mut run => break r,
                Some(ev) = rx.recv() => self.event(&id, runs, &mut sent, ev).await,
                _ = beat.tick() => {
                    if let Err(e) = self.timed(msg.ack_with(AckKind::Progress)).await {
                        tracing::warn!(job = %id, "cluster: heartbeat failed: {e}");
                    }
                }
            }
        };
        while let Ok(ev) = rx.try_recv() {
            self.event(&id, runs, &mut sent, ev).await;
        }

        let ended = match outcome {
            Ok(Ok(JobOutcome {
                result,
                rendered,
                trace,
            })) => {
                for s in &trace.stages {
                    self.metrics
                        .record_stage_latency(s.stage.name(), Duration::from_millis(s.duration_ms));
                }
                self.metrics.record_verdict(result.verdict.status.name());
                let mut r = base.ended("succeeded", &self.node);
                r.result = Some(serde_json::to_value(&result).unwrap_or(Value::Null));
                r.output = Some(rendered);
                Some(r)
            }
            Ok(Err(e)) => {
                let mut r = base.ended("failed", &self.node);
                r.error = Some(json!({"message": e.to_string(), "type": error_kind(&e)}));
                Some(r)
            }
            Err(e) if e.is_panic() => {
                let why = panic_message(e.into_panic());
                tracing::error!(job = %id, "the job's run panicked: {why}");
                let mut r = base.ended("failed", &self.node);
                r.error = Some(json!({
                    "message": format!("internal error: the job's run panicked: {why}"),
                    "type": "server_error",
                }));
                Some(r)
            }
            // Stopped: by a cancel (its end is written) or by this node's shutdown.
            Err(_) => None,
        };
        match ended {
            Some(r) => match self.end(&r, true).await {
                Ok(won) => {
                    if won {
                        self.metrics.record_job(match r.state.as_str() {
                            "succeeded" => "succeeded",
                            _ => "failed",
                        });
                    } else {
                        tracing::info!(job = %id, "cluster: the job had ended already (another node finished it first, or it was cancelled); this run's result is discarded");
                    }
                    self.run_here.fetch_add(1, Ordering::Relaxed);
                    let _ = self.timed(msg.double_ack()).await;
                }
                Err(e) => {
                    tracing::warn!(job = %id, "cluster: cannot write the job's end ({e}); it is handed back to run again");
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
            },
            None => match self.kv.get(format!("end.{id}")).await {
                Ok(Some(_)) => {
                    self.run_here.fetch_add(1, Ordering::Relaxed);
                    let _ = msg.double_ack().await;
                }
                // Shutting down: hand it back at once.
                _ => {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
            },
        }
        self.running_map().remove(&id);
        self.ended.send_modify(|n| *n += 1);
    }

    /// Publishes the `sent`-th event of the job's run `run`.
    async fn event(&self, id: &str, run: u32, sent: &mut u64, ev: forgeline_pipeline::JobEvent) {
        let v = super::api_event(&self.metrics, &ev);
        *sent += 1;
        self.publish_event(id, &format!("{id}.{run}.{sent}"), &v)
            .await;
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no job `{id}`")).with_param("id")
}

/// Pulls one job at a time while this node has room, and runs each.
async fn pull_jobs(cluster: Arc<Cluster>) {
    let room = Arc::new(Semaphore::new(cluster.max_running));
    loop {
        let Ok(permit) = room.clone().acquire_owned().await else {
            return;
        };
        if cluster.stopping.load(Ordering::SeqCst) {
            return;
        }
        let batch = cluster
            .workers
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await;
        let next = match batch {
            // Bounded here too: a pull the broker forgot (it restarted) never ends by itself.
            Ok(mut b) => match tokio::time::timeout(Duration::from_secs(10), b.next()).await {
                Ok(n) => n,
                Err(_) => continue,
            },
            Err(e) => {
                tracing::warn!("cluster {}: cannot pull jobs: {e}; retrying", cluster.url);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match next {
            Some(Ok(msg)) => {
                if cluster.stopping.load(Ordering::SeqCst) {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    return;
                }
                let c = cluster.clone();
                tokio::spawn(async move {
                    c.run_one(msg).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(
                    "cluster {}: pulling a job failed: {e}; retrying",
                    cluster.url
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None => {}
        }
    }
}

async fn listen_for_cancels(cluster: std::sync::Weak<Cluster>, mut sub: async_nats::Subscriber) {
    while let Some(m) = sub.next().await {
        let Some(c) = cluster.upgrade() else { return };
        let id = String::from_utf8_lossy(&m.payload).to_string();
        let run = c.running_map().get(&id).cloned();
        if let Some(a) = run {
            tracing::info!(job = %id, "cluster: cancelled; stopping its run here");
            a.abort();
        }
    }
}

async fn watch_queue(cluster: std::sync::Weak<Cluster>) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        if let Ok(info) = c.workers.get_info().await {
            c.queue_depth.store(info.num_pending, Ordering::Relaxed);
        }
        drop(c);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

// ---- routes ----

pub(super) async fn create(cluster: &Cluster, task: TaskRequest, format: Format) -> Response {
    match cluster.submit(task, format).await {
        Ok(v) => {
            let location = format!("/v1/jobs/{}", v["id"].as_str().unwrap_or_default());
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(v),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn show(cluster: &Cluster, id: &str) -> Response {
    match cluster.find(id).await {
        Ok(r) => Json(r.to_json()).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn cancel(cluster: &Cluster, id: &str) -> Response {
    match cluster.cancel_or_remove(id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The job's events from the stream, from its first, following it until its `job.end`.
pub(super) async fn events(cluster: Arc<Cluster>, id: &str) -> Response {
    if let Err(e) = cluster.find(id).await {
        return e.into_response();
    }
    let consumer = cluster
        .events
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{EVENTS_PREFIX}{id}"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await;
    let messages = match consumer {
        Ok(c) => c.messages().await.map_err(nats_err),
        Err(e) => Err(nats_err(e)),
    };
    match messages {
        Ok(m) => Sse::new(event_stream(cluster, id.to_string(), m))
            .keep_alive(KeepAlive::default())
            .into_response(),
        Err(e) => ApiError::unavailable(format!(
            "the job's events cannot be read ({e}); retry later"
        ))
        .into_response(),
    }
}

fn event_stream(
    cluster: Arc<Cluster>,
    id: String,
    messages: consumer::pull::Ordered,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct St {
        cluster: Arc<Cluster>,
        id: String,
        messages: consumer::pull::Ordered,
        /// Quiet spells seen since the job's end was found in the bucket.
        quiet_after_end: u32,
        done: bool,
    }
    let st = St {
        cluster,
        id,
        messages,
        quiet_after_end: 0,
        done: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(2), st.messages.next()).await {
                Ok(Some(Ok(m))) => {
                    let text = String::from_utf8_lossy(&m.payload).to_string();
                    let end = serde_json::from_str::<Value>(&text)
                        .is_ok_and(|v| v["object"] == "job.end");
                    let mut out = vec![Ok(SseEvent::default().data(text))];
                    if end {
                        st.done = true;
                        out.push(Ok(SseEvent::default().data("[DONE]")));
                    }
                    return Some((futures_util::stream::iter(out), st));
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(job = %st.id, "cluster: reading the job's events: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(None) => return None,
                Err(_) => {
                    // Quiet: if the job has ended and its `job.end` never came (its writer
                    // died in between), say how it ended after a second quiet spell.
                    if let Ok(Some(end)) = st.cluster.record(&format!("end.{}", st.id)).await {
                        st.quiet_after_end += 1;
                        if st.quiet_after_end >= 2 {
                            st.done = true;
                            let ev = json!({
                                "object": "job.end",
                                "id": end.id,
                                "state": end.state,
                                "error": end.error,
                            });
                            let out = vec![
                                Ok(SseEvent::default().data(ev.to_string())),
                                Ok(SseEvent::default().data("[DONE]")),
                            ];
                            return Some((futures_util::stream::iter(out), st));
                        }
                    } else if let Ok(None) = st.cluster.record(&format!("state.{}", st.id)).await {
                        // Removed meanwhile.
                        return None;
                    }
                }
            }
        }
    })
    .flatten()
}
