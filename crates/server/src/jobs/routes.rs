//! `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events` (SSE), and
//! `DELETE /v1/jobs/{id}`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use forgeline_pipeline::{ContextFile, Format, TaskRequest};
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{Job, Jobs};
use crate::app::AppState;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::fields::{kind, parse_object, Fields};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(create))
        .route("/v1/jobs/{id}", get(show).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
}

fn jobs(app: &AppState) -> ApiResult<&Arc<Jobs>> {
    app.jobs
        .as_ref()
        .ok_or_else(|| ApiError::not_found("pipeline jobs are not enabled on this server"))
}

fn job(app: &AppState, id: &str) -> ApiResult<Arc<Job>> {
    jobs(app)?
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}`")).with_param("id"))
}

async fn create(State(app): State<AppState>, JsonBody(body): JsonBody) -> Response {
    if let Some(c) = &app.cluster {
        return match parse_job(&body) {
            Ok(_) if app.is_draining() => {
                ApiError::unavailable("the server is shutting down").into_response()
            }
            Ok((task, format)) => super::cluster::create(c, task, format).await,
            Err(e) => e.into_response(),
        };
    }
    let run = || {
        let (task, format) = parse_job(&body)?;
        if app.is_draining() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let job = jobs(&app)?.submit(task, format)?;
        let location = format!("/v1/jobs/{}", job.id);
        Ok((
            StatusCode::ACCEPTED,
            [(header::LOCATION, location)],
            Json(job.to_json()),
        )
            .into_response())
    };
    run().unwrap_or_else(|e: ApiError| e.into_response())
}

async fn show(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(c) = &app.cluster {
        return super::cluster::show(c, &id).await;
    }
    match job(&app, &id) {
        Ok(j) => Json(j.to_json()).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Cancels a running job; removes a finished one. Answers with the job as it now is.
async fn cancel(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(c) = &app.cluster {
        return super::cluster::cancel(c, &id).await;
    }
    let run = || {
        let j = job(&app, &id)?;
        let cancelled = jobs(&app)?.cancel_or_remove(&j);
        let mut v = j.to_json();
        v["deleted"] = json!(!cancelled);
        Ok(Json(v).into_response())
    };
    run().unwrap_or_else(|e: ApiError| e.into_response())
}

/// The job's events so far, then each as it happens, then a `job.end` event and `[DONE]`.
async fn events(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    if let Some(c) = &app.cluster {
        return super::cluster::events(c.clone(), &id).await;
    }
    match job(&app, &id) {
        Ok(j) => Sse::new(event_stream(j))
            .keep_alive(KeepAlive::default())
            .into_response(),
        Err(e) => e.into_response(),
    }
}

fn event_stream(job: Arc<Job>) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct St {
        job: Arc<Job>,
        changed: watch::Receiver<u64>,
        next: usize,
        pending: VecDeque<SseEvent>,
        ended: bool,
    }
    let st = St {
        changed: job.changed.subscribe(),
        job,
        next: 0,
        pending: VecDeque::new(),
        ended: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.ended {
                return None;
            }
            // Marked seen before reading, so that a change after the read wakes us.
            st.changed.borrow_and_update();
            let (new, state) = st.job.events_since(st.next);
            st.next += new.len();
            for ev in &new {
                st.pending
                    .push_back(SseEvent::default().data(ev.to_string()));
            }
            if !new.is_empty() {
                continue;
            }
            if state.is_done() {
                let error = st.job.lock().error.clone();
                let end =
                    json!({"object": "job.end", "id": st.job.id, "state": state, "error": error});
                st.pending
                    .push_back(SseEvent::default().data(end.to_string()));
                st.pending.push_back(SseEvent::default().data("[DONE]"));
                st.ended = true;
                continue;
            }
            if st.changed.changed().await.is_err() {
                // The job is gone (cannot happen while we hold it); end quietly.
                st.ended = true;
            }
        }
    })
}

/// `{"task", "files": [{"name", "content"}], "tests": {"name", "content"} | "source",
/// "entry_point", "format": "md" | "code" | "json"}`.
pub fn parse_job(body: &[u8]) -> ApiResult<(TaskRequest, Format)> {
    let obj = parse_object(body)?;
    let f = Fields::new(&obj, "");
    let text = f
        .str("task")?
        .ok_or_else(|| ApiError::field("task", "`task` is required"))?;
    let mut task = TaskRequest::new(text);
    if let Some(files) = f.array("files")? {
        for (i, v) in files.iter().enumerate() {
            task.files.push(file(&format!("files[{i}]"), v)?);
        }
    }
    task.tests = match f.get("tests") {
        None => None,
        Some(Value::String(s)) => Some(ContextFile::new("test_solution.py", s.clone())),
        Some(v @ Value::Object(_)) => Some(file("tests", v)?),
        Some(other) => {
            return Err(ApiError::field(
                "tests",
                format!(
                    "`tests` must be a string or an object with `name` and `content`, not {}",
                    kind(other)
                ),
            ))
        }
    };
    task.entry_point = f.str("entry_point")?.map(str::to_string);
    let format = match f.str("format")? {
        None => Format::default(),
        Some(s) => s
            .parse()
            .map_err(|e: String| ApiError::field("format", e))?,
    };
    task.validate().map_err(|e| match &e {
        forgeline_pipeline::Error::Task(p) => ApiError::field(p.field(), e.to_string()),
        _ => ApiError::invalid(e.to_string()),
    })?;
    Ok((task, format))
}

fn file(path: &str, v: &Value) -> ApiResult<ContextFile> {
    let Value::Object(o) = v else {
        return Err(ApiError::field(
            path,
            format!(
                "`{path}` must be an object with `name` and `content`, not {}",
                kind(v)
            ),
        ));
    };
    let f = Fields::new(o, path);
    let name = f.require("name")?;
    let content = f.require("content")?;
    match (name, content) {
        (Value::String(n), Value::String(c)) => Ok(ContextFile::new(n.clone(), c.clone())),
        _ => Err(ApiError::field(
            path,
            format!("`{path}.name` and `{path}.content` must be strings"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> ApiResult<(TaskRequest, Format)> {
        parse_job(v.to_string().as_bytes())
    }

    #[test]
    fn a_job_body_becomes_a_task() {
        let (t, f) = parse(json!({
            "task": "Write add(a, b).",
            "files": [{"name": "util.py", "content": "X = 1\n"}],
            "tests": "from solution import add\nassert add(1, 2) == 3\n",
            "entry_point": "add",
            "format": "code",
        }))
        .unwrap();
        assert_eq!(t.task, "Write add(a, b).");
        assert_eq!(t.files, vec![ContextFile::new("util.py", "X = 1\n")]);
        assert_eq!(t.tests.unwrap().name, "test_solution.py");
        assert_eq!(t.entry_point.as_deref(), Some("add"));
        assert_eq!(f, Format::Code);
        let (t, f) =
            parse(json!({"task": "x", "tests": {"name": "test_a.py", "content": "pass"}})).unwrap();
        assert_eq!(t.tests.unwrap().name, "test_a.py");
        assert_eq!(f, Format::Md);
    }

    #[test]
    fn bad_job_bodies_name_the_field() {
        let param = |v: Value| parse(v).unwrap_err().param.unwrap();
        assert_eq!(param(json!({})), "task");
        assert_eq!(param(json!({"task": " "})), "task");
        assert_eq!(param(json!({"task": 1})), "task");
        assert_eq!(param(json!({"task": "x", "files": {}})), "files");
        assert_eq!(param(json!({"task": "x", "files": [3]})), "files[0]");
        assert_eq!(
            param(json!({"task": "x", "files": [{"name": "a.py"}]})),
            "files[0].content"
        );
        assert_eq!(
            param(json!({"task": "x", "files": [{"name": "../a.py", "content": ""}]})),
            "files"
        );
        assert_eq!(param(json!({"task": "x", "tests": 5})), "tests");
        assert_eq!(
            param(json!({"task": "x", "tests": {"name": "a b.py", "content": ""}})),
            "tests"
        );
        assert_eq!(
            param(json!({"task": "x", "entry_point": "a b"})),
            "entry_point"
        );
        assert_eq!(param(json!({"task": "x", "format": "pdf"})), "format");
    }
}
