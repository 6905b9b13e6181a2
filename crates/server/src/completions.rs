//! `POST /v1/chat/completions` and `POST /v1/completions`: a validated request goes to the
//! engine; the answer comes back whole, or as server-sent events whose body stream owns the
//! engine's `ResponseStream`, so that a client who goes away cancels its generation.

use std::collections::VecDeque;
use std::convert::Infallible;

use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forgeline_engine::scheduler::{Event, ResponseStream};
use futures_util::Stream;

use crate::app::AppState;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::openai::AnswerMeta;
use crate::request::{parse_chat, parse_completion, ApiRequest, Endpoint};
use crate::shutdown::CancelSignal;

pub async fn chat(State(app): State<AppState>, body: JsonBody) -> Response {
    handle(app, body, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn completion(State(app): State<AppState>, body: JsonBody) -> Response {
    handle(app, body, Endpoint::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Longest deadline a request gets: far beyond any real one, and small enough that adding
/// it to the clock cannot overflow.
const MAX_DEADLINE: Duration = Duration::from_secs(366 * 24 * 3600);

async fn handle(
    app: AppState,
    JsonBody(body): JsonBody,
    endpoint: Endpoint,
) -> ApiResult<Response> {
    let req = match endpoint {
        Endpoint::Chat => parse_chat(&body, &app.models)?,
        Endpoint::Completion => parse_completion(&body, &app.models)?,
    };
    let meta = AnswerMeta::new(endpoint, req.model.clone(), app.next_serial());
    let (stream, include_usage) = (req.stream, req.include_usage);
    let events = submit(&app, req).await?;
    if stream {
        let body = sse_events(meta, events, include_usage, app.cancel.clone());
        return Ok(Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut cancel = app.cancel.clone();
    let done = tokio::select! {
        c = events.collect() => c.map_err(|e| ApiError::from_engine(&e, endpoint.prompt_param()))?,
        _ = cancel.cancelled() => return Err(shutting_down()),
    };
    Ok(Json(meta.response(&done)).into_response())
}

fn shutting_down() -> ApiError {
    ApiError::unavailable("the server is shutting down; the request was cancelled")
}

/// Queues the request on the engine: either it is accepted whole or it fails (429 when the
/// queue is full), nothing in between. Tokenizing a long prompt and compiling a schema take
/// time, so they run off the async workers.
async fn submit(app: &AppState, req: ApiRequest) -> ApiResult<ResponseStream> {
    if app.is_draining() {
        return Err(shutting_down());
    }
    if !app.client.is_alive() {
        return Err(ApiError::unavailable(
            "the engine thread has stopped: no request can run; restart the server",
        ));
    }
    let client = app.client.clone();
    let context = app
        .models
        .iter()
        .find(|m| m.name == req.model)
        .map(|m| m.context_length)
        .unwrap_or(0);
    let default_max = app.config.default_max_tokens;
    let deadline = app.config.request_timeout.map(|d| d.min(MAX_DEADLINE));
    let prompt_param = req.endpoint.prompt_param();
    tokio::task::spawn_blocking(move || {
        let mut g = req.generate;
        g.deadline = deadline;
        g.max_tokens = match req.max_tokens {
            Some(n) => n,
            // As much as the context leaves, within the server's default. A prompt that
            // fills the context gets 1 here, and the engine's message about its length.
            None => {
                let prompt = client.tokenize(&g)?.len();
                default_max.min(context.saturating_sub(prompt)).max(1)
            }
        };
        client.generate(g)
    })
    .await
    .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
    .map_err(|e| ApiError::from_engine(&e, prompt_param))
}

/// The stream of SSE events of one answer. It owns `events`: when the client disconnects,
/// the HTTP body (and so this stream) is dropped, which cancels the engine request.
fn sse_events(
    meta: AnswerMeta,
    events: ResponseStream,
    include_usage: bool,
    cancel: CancelSignal,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let state = SseState {
        meta,
        events,
        include_usage,
        cancel,
        pending: VecDeque::new(),
        sent_first: false,
        ended: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.ended {
                return None;
            }
            let next = tokio::select! {
                ev = st.events.next() => ev,
                _ = st.cancel.cancelled() => {
                    st.fail(&shutting_down());
                    continue;
                }
            };
            st.absorb(next);
        }
    })
}

struct SseState {
    meta: AnswerMeta,
    events: ResponseStream,
    include_usage: bool,
    cancel: CancelSignal,
    pending: VecDeque<SseEvent>,
    sent_first: bool,
    ended: bool,
}

impl SseState {
    fn push(&mut self, v: serde_json::Value) {
        self.pending
            .push_back(SseEvent::default().data(v.to_string()));
    }

    /// Turns one engine event into SSE events.
    fn absorb(&mut self, ev: Option<forgeline_engine::Result<Event>>) {
        match ev {
            // Text held back (a possible stop string, half a character) arrives later.
            Some(Ok(Event::Delta { text, .. })) if text.is_empty() => {}
            Some(Ok(Event::Delta { text, .. })) => {
                let chunk = self.meta.delta(&text, !self.sent_first);
                self.sent_first = true;
                self.push(chunk);
            }
            Some(Ok(Event::Done { stop_reason, usage })) => {
                if !self.sent_first {
                    let chunk = self.meta.delta("", true);
                    self.push(chunk);
                }
                let finish = self.meta.finish(stop_reason);
                self.push(finish);
                if self.include_usage {
                    let u = self.meta.usage_chunk(&usage);
                    self.push(u);
                }
                self.pending.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
            Some(Err(e)) => {
                let err = ApiError::from_engine(&e, self.meta.endpoint.prompt_param());
                self.fail(&err);
            }
            None => self.fail(&ApiError::internal(
                "the engine stopped before the answer was complete",
            )),
        }
    }

    /// Ends the stream with an error event, as OpenAI's API does mid-stream.
    fn fail(&mut self, e: &ApiError) {
        self.push(e.body());
        self.ended = true;
    }
}
