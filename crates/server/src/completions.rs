//! `POST /v1/chat/completions` and `POST /v1/completions`: a validated request goes to the
//! engine; the answer comes back whole, or as server-sent events whose body stream owns the
//! engine's `ResponseStream`, so that a client who goes away cancels its generation.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forgeline_engine::error::Validation;
use forgeline_engine::scheduler::{Event, GenerateRequest, ResponseStream, Usage};
use futures_util::{Stream, StreamExt};

use crate::app::AppState;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::metrics::RequestTimer;
use crate::openai::{total_usage, AnswerMeta};
use crate::request::{parse_chat, parse_completion, ApiRequest, Endpoint};
use crate::shutdown::CancelSignal;
use crate::tools::{CallParser, Piece};

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
    let started = Instant::now();
    let req = match endpoint {
        Endpoint::Chat => parse_chat(&body, &app.models)?,
        Endpoint::Completion => parse_completion(&body, &app.models)?,
    };
    let meta = AnswerMeta::new(endpoint, req.model.clone(), app.next_serial())
        .with_logprobs(req.generate.logprobs.is_some())
        .with_tools(req.tools.as_ref().is_some_and(|t| t.parsed()));
    let (stream, include_usage) = (req.stream, req.include_usage);
    let timer = RequestTimer::new(app.metrics.clone(), &req.model, started);
    let choices = submit(&app, req).await?;
    if stream {
        let body = sse_events(meta, choices, include_usage, app.cancel.clone(), timer);
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
    for c in &done {
        timer.finished(&c.usage);
    }
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
    // The grammar of function calls is built from the functions' schemas: one it cannot
    // compile is the `tools` field's fault.
    let calls_constrained = req.tools.as_ref().is_some_and(|t| t.parsed());
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
    .map_err(|e| match e {
        forgeline_engine::Error::Validation(Validation::Constraint { reason, .. })
            if calls_constrained =>
        {
            ApiError::field(
                "tools",
                format!("the functions' `parameters` schemas cannot constrain the calls: {reason}"),
            )
        }
        e => ApiError::from_engine(&e, prompt_param),
    })
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
    timer: RequestTimer,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let n = choices.len();
    let meta_tools = meta.tools;
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
        timer,
        pending: VecDeque::new(),
        sent_first: vec![false; n],
        usage: vec![None; n],
        offsets: vec![0; n],
        parsers: if meta_tools {
            (0..n).map(|_| CallParser::default()).collect()
        } else {
            Vec::new()
        },
        sent_calls: vec![0; n],
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
    /// Records each choice's timings when it is done.
    timer: RequestTimer,
    pending: VecDeque<SseEvent>,
    /// Per choice: whether its first chunk (with the chat role) went out.
    sent_first: Vec<bool>,
    /// Per choice: its usage, once it is done.
    usage: Vec<Option<Usage>>,
    /// Per choice: the bytes of its tokens so far (for `text_offset`).
    offsets: Vec<usize>,
    /// Per choice, when the answer is read for function calls: the reader of its text.
    parsers: Vec<CallParser>,
    /// Per choice: the calls sent.
    sent_calls: Vec<usize>,
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
            Some((_, Ok(Event::Delta { text, logprobs, .. })))
                if text.is_empty() && logprobs.is_empty() => {}
            Some((i, Ok(Event::Delta { text, logprobs, .. }))) => {
                let lp = self.meta.logprobs_json(&logprobs, self.offsets[i]);
                self.offsets[i] += logprobs.iter().map(|t| t.bytes.len()).sum::<usize>();
                match self.parsers.get_mut(i) {
                    Some(p) => {
                        let pieces = p.push(&text);
                        self.send_pieces(i, pieces, lp);
                    }
                    None => self.text_chunk(i, &text, lp),
                }
            }
            Some((i, Ok(Event::Done { stop_reason, usage }))) => {
                if let Some(p) = self.parsers.get_mut(i) {
                    let pieces = p.finish();
                    self.send_pieces(i, pieces, serde_json::Value::Null);
                }
                if !self.sent_first[i] {
                    self.text_chunk(i, "", serde_json::Value::Null);
                }
                let called = self.parsers.get(i).is_some_and(|p| p.calls() > 0);
                let finish = self.meta.finish(i, stop_reason, called);
                self.push(finish);
                self.timer.finished(&usage);
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

    /// Choice `i`'s text and calls as chunks; `logprobs` go with the first (alone in an
    /// empty chunk when the text is held back).
    fn send_pieces(&mut self, i: usize, pieces: Vec<Piece>, mut logprobs: serde_json::Value) {
        if pieces.is_empty() && !logprobs.is_null() {
            self.text_chunk(i, "", logprobs);
            return;
        }
        for piece in pieces {
            let lp = std::mem::take(&mut logprobs);
            match piece {
                Piece::Text(t) => self.text_chunk(i, &t, lp),
                Piece::Call(c) => {
                    let call = self.meta.call_json(i, self.sent_calls[i], &c);
                    self.sent_calls[i] += 1;
                    let chunk = self.meta.call_delta(i, call, !self.sent_first[i], lp);
                    self.sent_first[i] = true;
                    self.push(chunk);
                }
            }
        }
    }

    fn text_chunk(&mut self, i: usize, text: &str, logprobs: serde_json::Value) {
        let chunk = self.meta.delta(i, text, !self.sent_first[i], logprobs);
        self.sent_first[i] = true;
        self.push(chunk);
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
