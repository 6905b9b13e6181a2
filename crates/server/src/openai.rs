//! The JSON of OpenAI's answers: whole responses, stream chunks, usage, finish reasons.

use forgeline_engine::scheduler::{Completion, TokenLogprob, Usage};
use forgeline_engine::stop::StopReason;
use serde_json::{json, Value};

use crate::request::Endpoint;
use crate::tools::{split_calls, ParsedCall};
use crate::ModelCard;

/// What every chunk and response of one request repeats.
#[derive(Clone, Debug)]
pub struct AnswerMeta {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    /// Whether the request asked for log-probabilities (`logprobs`).
    pub logprobs: bool,
    /// Whether answers are read for function calls (`tools`, unless `tool_choice` is none).
    pub tools: bool,
}

impl AnswerMeta {
    pub fn new(endpoint: Endpoint, model: String, serial: u64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            id: format!("{prefix}-{:x}{serial:06x}", now.as_millis()),
            created: now.as_secs(),
            model,
            endpoint,
            logprobs: false,
            tools: false,
        }
    }

    pub fn with_tools(mut self, on: bool) -> Self {
        self.tools = on;
        self
    }

    /// The id of call `k` of choice `choice`.
    pub fn call_id(&self, choice: usize, k: usize) -> String {
        let tail = self.id.rsplit('-').next().unwrap_or_default();
        format!("call_{tail}_{choice}_{k}")
    }

    /// A choice's `tool_calls` entry for call `k`.
    pub fn call_json(&self, choice: usize, k: usize, call: &ParsedCall) -> Value {
        call.to_json(&self.call_id(choice, k), k)
    }

    /// A streamed call of choice `index`: the whole call in one chunk.
    pub fn call_delta(&self, index: usize, call: Value, first: bool, logprobs: Value) -> Value {
        let mut delta = json!({"tool_calls": [call]});
        if first {
            delta["role"] = json!("assistant");
            delta["content"] = Value::Null;
        }
        self.wrap(
            true,
            json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null}]),
        )
    }

    pub fn with_logprobs(mut self, on: bool) -> Self {
        self.logprobs = on;
        self
    }

    /// A choice's `logprobs` for these tokens (`offset`: the bytes of the choice's tokens
    /// before them), or null when the request did not ask.
    pub fn logprobs_json(&self, tokens: &[TokenLogprob], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => chat_logprobs(tokens),
            Endpoint::Completion => completion_logprobs(tokens, offset),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// A non-streamed answer: one choice per completion, in order.
    pub fn response(&self, choices: &[Completion]) -> Value {
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let mut finish = finish_reason(c.stop_reason);
                let logprobs = self.logprobs_json(&c.logprobs, 0);
                match self.endpoint {
                    Endpoint::Chat if self.tools => {
                        let (content, calls) = split_calls(&c.text);
                        let mut message =
                            json!({"role": "assistant", "content": content, "refusal": null});
                        if !calls.is_empty() {
                            let list: Vec<Value> = calls
                                .iter()
                                .enumerate()
                                .map(|(k, call)| self.call_json(index, k, call))
                                .collect();
                            message["tool_calls"] = Value::Array(list);
                            finish = calls_finish(finish);
                        }
                        json!({
                            "index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": finish,
                        })
                    }
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                    Endpoint::Completion => json!({
                        "index": index, "text": c.text, "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        let mut v = self.wrap(false, Value::Array(list));
        v["usage"] = usage(&total_usage(choices.iter().map(|c| &c.usage)));
        v
    }

    /// A streamed piece of choice `index`'s text; `first` adds the chat role; `logprobs` is
    /// the piece's (`logprobs_json`).
    pub fn delta(&self, index: usize, text: &str, first: bool, logprobs: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat if first => json!({
                "index": index, "delta": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": null,
            }),
            Endpoint::Chat => json!({
                "index": index, "delta": {"content": text}, "logprobs": logprobs,
                "finish_reason": null,
            }),
            Endpoint::Completion => json!({
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": null,
            }),
        };
        self.wrap(true, json!([choice]))
    }

    /// The chunk that ends choice `index`; `called`: it made function calls.
    pub fn finish(&self, index: usize, reason: StopReason, called: bool) -> Value {
        let mut finish = finish_reason(reason);
        if called {
            finish = calls_finish(finish);
        }
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": index, "delta": {}, "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Completion => json!({
                "index": index, "text": "", "logprobs": null, "finish_reason": finish,
            }),
        };
        self.wrap(true, json!([choice]))
    }

    /// `stream_options.include_usage`: the last chunk, with no choice and the usage.
    pub fn usage_chunk(&self, u: &Usage) -> Value {
        let mut v = self.wrap(true, json!([]));
        v["usage"] = usage(u);
        v
    }
}

/// A log-probability as JSON can carry it: -inf (a token no one could sample) as vLLM
/// writes it.
fn finite(lp: f32) -> f32 {
    lp.max(-9999.0)
}

fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The chat form: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| {
                    json!({"token": token_text(&a.bytes), "logprob": finite(a.logprob),
                           "bytes": a.bytes})
                })
                .collect();
            json!({"token": token_text(&t.bytes), "logprob": finite(t.logprob),
                   "bytes": t.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions form: parallel lists of tokens, their log-probabilities, the top
/// alternatives as `{token: logprob}` and each token's byte offset in the choice's text.
fn completion_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.bytes.len();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = serde_json::Map::new();
            for a in &t.top {
                m.entry(token_text(&a.bytes))
                    .or_insert_with(|| json!(finite(a.logprob)));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| token_text(&t.bytes)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| finite(t.logprob)).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// The finish reason of an answer that made calls: `tool_calls` where it ended by itself.
fn calls_finish(reason: &'static str) -> &'static str {
    if reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// OpenAI's finish reasons: `stop` for a natural or requested end, `length` when a limit
/// (tokens, context, the server's deadline) cut the answer short.
pub fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos
        | StopReason::StopToken
        | StopReason::StopString
        | StopReason::ConstraintDone => "stop",
        StopReason::MaxTokens | StopReason::ContextFull | StopReason::Deadline => "length",
    }
}

/// The usage of the choices of one request: the prompt they share counted once (as the
/// first choice computed it), their completions added up.
pub fn total_usage<'a>(each: impl IntoIterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage::default();
    for (i, u) in each.into_iter().enumerate() {
        if i == 0 {
            total = u.clone();
        } else {
            total.completion_tokens += u.completion_tokens;
        }
    }
    total
}

pub fn usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// `GET /v1/models`.
pub fn model_list(models: &[ModelCard]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|m| {
            json!({
                "id": m.name, "object": "model", "created": 0, "owned_by": "forgeline",
                "context_length": m.context_length,
            })
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_responses_have_openais_shape() {
        let m = AnswerMeta::new(Endpoint::Chat, "m".into(), 3);
        assert!(m.id.starts_with("chatcmpl-"));
        let d = m.delta(0, "Hi", true, Value::Null);
        assert_eq!(d["object"], "chat.completion.chunk");
        assert_eq!(d["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(d["choices"][0]["delta"]["content"], "Hi");
        assert!(m.delta(0, "x", false, Value::Null)["choices"][0]["delta"]
            .get("role")
            .is_none());
        let f = m.finish(2, StopReason::MaxTokens, false);
        assert_eq!(f["choices"][0]["finish_reason"], "length");
        assert_eq!(f["choices"][0]["index"], 2);
        let u = Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            cached_prompt_tokens: 4,
            ..Default::default()
        };
        let uc = m.usage_chunk(&u);
        assert_eq!(uc["choices"], json!([]));
        assert_eq!(uc["usage"]["total_tokens"], 7);
        assert_eq!(uc["usage"]["prompt_tokens_details"]["cached_tokens"], 4);

        let c = AnswerMeta::new(Endpoint::Completion, "m".into(), 4);
        let done = Completion {
            text: "x = 1".into(),
            stop_reason: StopReason::StopString,
            usage: u,
            ..Default::default()
        };
        let r = c.response(std::slice::from_ref(&done));
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["choices"][0]["text"], "x = 1");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(r["usage"]["completion_tokens"], 2);
        // Several choices: each indexed, the shared prompt counted once.
        let r = c.response(&[done.clone(), done.clone(), done]);
        assert_eq!(r["choices"][2]["index"], 2);
        assert_eq!(r["usage"]["prompt_tokens"], 5);
        assert_eq!(r["usage"]["completion_tokens"], 6);
        assert_eq!(r["usage"]["total_tokens"], 11);
    }
}
