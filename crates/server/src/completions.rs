//! `POST /v1/chat/completions` and `POST /v1/completions`: a validated request goes to the
//! engine; the answer comes back whole, or as server-sent events whose body stream owns the
//! engine's `ResponseStream`, so that a client who goes away cancels its generation.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forgeline_engine::scheduler::{Event, GenerateRequest, ResponseStream, Usage};
use futures_util::{Stream, StreamExt};

use crate::app::AppState;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::openai::{total_usage, AnswerMeta};
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
    let choices = submit(&app, req).await?;
    if stream {
        let body = sse_events(meta, choices, include_usage, app.cancel.clone());
        return Ok(Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut cancel = app.cancel.clone();
    let all = futures_util::future::try_join_all(choices.into_iter().map(ResponseStream::collect));
    let done = tokio::select! {
        c = all => c.map_err(|e| ApiError::from_engine(&e, endpoint.prompt_param()))?,
        _ = cancel.cancelled() => return Err(shutting_down()),
    };
    Ok(Json(meta.response(&done)).into_response())
}

fn shutting_down() -> ApiError {
    ApiError::unavailable("the server is shutting down; the request was cancelled")
}

/// Queues the request's choices on the engine, choice `i` seeded with the seed plus `i`:
/// either they are all accepted or it fails (429 when the queue is full; the choices queued
/// before are dropped, which cancels them), nothing in between. The choices share their
/// prompt's KV through the prefix cache: the first computes it, the others wait for it and
/// reuse it. Tokenizing a long prompt and compiling a schema take time, so they run off the
/// async workers.
async fn submit(app: &AppState, req: ApiRequest) -> ApiResult<Vec<ResponseStream>> {
    if app.is_draining() {
        return Err(shutting_down());
    }
    if !app.client.is_alive() {
        return Err(ApiError::unavailable(
            "the engine thread has stopped: no request can run; restart the server",
        ));
    }
    if req.n > app.client.max_waiting() {
        return Err(ApiError::field(
            "n",
            format!(
                "`n` is {}, but this server queues at most {} sequences (--max-waiting)",
                req.n,
                app.client.max_waiting()
            ),
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
        choices(&g, req.n)
            .into_iter()
            .map(|choice| client.generate(choice))
            .collect::<forgeline_engine::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
    .map_err(|e| ApiError::from_engine(&e, prompt_param))
}

/// The engine requests of `n` choices: the request as given, choice `i` seeded with its
/// seed plus `i` (so that each equals a lone request with that seed).
fn choices(g: &GenerateRequest, n: usize) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            let mut choice = g.clone();
            choice.sampling.seed = g.sampling.seed.wrapping_add(i as u64);
            choice
        })
        .collect()
}

/// One stream of every choice's events, each tagged with its choice's index.
type ChoiceEvents = Pin<Box<dyn Stream<Item = (usize, forgeline_engine::Result<Event>)> + Send>>;

/// The stream of SSE events of one answer. It owns the choices' streams: when the client
/// disconnects, the HTTP body (and so this stream) is dropped, which cancels the engine
/// requests.
fn sse_events(
    meta: AnswerMeta,
    choices: Vec<ResponseStream>,
    include_usage: bool,
    cancel: CancelSignal,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let n = choices.len();
    let tagged = choices.into_iter().enumerate().map(|(i, rs)| {
        futures_util::stream::unfold(
            rs,
            |mut rs| async move { rs.next().await.map(|ev| (ev, rs)) },
        )
        .map(move |ev| (i, ev))
        .boxed()
    });
    let state = SseState {
        meta,
        events: futures_util::stream::select_all(tagged).boxed(),
        include_usage,
        cancel,
        pending: VecDeque::new(),
        sent_first: vec![false; n],
        usage: vec![None; n],
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
    events: ChoiceEvents,
    include_usage: bool,
    cancel: CancelSignal,
    pending: VecDeque<SseEvent>,
    /// Per choice: whether its first chunk (with the chat role) went out.
    sent_first: Vec<bool>,
    /// Per choice: its usage, once it is done.
    usage: Vec<Option<Usage>>,
    ended: bool,
}

impl SseState {
    fn push(&mut self, v: serde_json::Value) {
        self.pending
            .push_back(SseEvent::default().data(v.to_string()));
    }

    /// Turns one engine event of a choice into SSE events; after the last choice's end,
    /// the usage (if asked) and `[DONE]`.
    fn absorb(&mut self, ev: Option<(usize, forgeline_engine::Result<Event>)>) {
        match ev {
            // Text held back (a possible stop string, half a character) arrives later.
            Some((_, Ok(Event::Delta { text, .. }))) if text.is_empty() => {}
            Some((i, Ok(Event::Delta { text, .. }))) => {
                let chunk = self.meta.delta(i, &text, !self.sent_first[i]);
                self.sent_first[i] = true;
                self.push(chunk);
            }
            Some((i, Ok(Event::Done { stop_reason, usage }))) => {
                if !self.sent_first[i] {
                    let chunk = self.meta.delta(i, "", true);
                    self.sent_first[i] = true;
                    self.push(chunk);
                }
                let finish = self.meta.finish(i, stop_reason);
                self.push(finish);
                self.usage[i] = Some(usage);
                if self.usage.iter().all(Option::is_some) {
                    if self.include_usage {
                        let total = total_usage(self.usage.iter().flatten());
                        let u = self.meta.usage_chunk(&total);
                        self.push(u);
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                    self.ended = true;
                }
            }
            Some((_, Err(e))) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use forgeline_engine::scheduler::Prompt;

    #[test]
    fn each_choice_is_the_request_with_the_next_seed() {
        let mut g = GenerateRequest::new(Prompt::Text("hi".into()), 4);
        g.sampling.seed = u64::MAX - 1;
        g.sampling.temperature = 0.7;
        let c = choices(&g, 3);
        let seeds: Vec<u64> = c.iter().map(|c| c.sampling.seed).collect();
        assert_eq!(seeds, [u64::MAX - 1, u64::MAX, 0]);
        assert!(c
            .iter()
            .all(|c| c.sampling.temperature == 0.7 && c.max_tokens == 4));
        assert_eq!(choices(&g, 1).len(), 1);
    }
}
