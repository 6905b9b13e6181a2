//! The JSON of OpenAI's answers: whole responses, stream chunks, usage, finish reasons.

use forgeline_engine::scheduler::{Completion, Usage};
use forgeline_engine::stop::StopReason;
use serde_json::{json, Value};

use crate::request::Endpoint;
use crate::ModelCard;

/// What every chunk and response of one request repeats.
#[derive(Clone, Debug)]
pub struct AnswerMeta {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
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
                let finish = finish_reason(c.stop_reason);
                match self.endpoint {
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                    Endpoint::Completion => json!({
                        "index": index, "text": c.text, "logprobs": null, "finish_reason": finish,
                    }),
                }
            })
            .collect();
        let mut v = self.wrap(false, Value::Array(list));
        v["usage"] = usage(&total_usage(choices.iter().map(|c| &c.usage)));
        v
    }

    /// A streamed piece of choice `index`'s text; `first` adds the chat role.
    pub fn delta(&self, index: usize, text: &str, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat if first => json!({
                "index": index, "delta": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": null,
            }),
            Endpoint::Chat => json!({
                "index": index, "delta": {"content": text}, "logprobs": null,
                "finish_reason": null,
            }),
            Endpoint::Completion => json!({
                "index": index, "text": text, "logprobs": null, "finish_reason": null,
            }),
        };
        self.wrap(true, json!([choice]))
    }

    /// The chunk that ends choice `index`.
    pub fn finish(&self, index: usize, reason: StopReason) -> Value {
        let finish = finish_reason(reason);
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
        let d = m.delta(0, "Hi", true);
        assert_eq!(d["object"], "chat.completion.chunk");
        assert_eq!(d["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(d["choices"][0]["delta"]["content"], "Hi");
        assert!(m.delta(0, "x", false)["choices"][0]["delta"]
            .get("role")
            .is_none());
        let f = m.finish(2, StopReason::MaxTokens);
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
