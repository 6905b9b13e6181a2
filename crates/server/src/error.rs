//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! that goes with them, and how engine errors map onto them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forgeline_engine::error::{KvShortage, Validation};
use forgeline_engine::Error as EngineError;
use serde_json::{json, Value};

/// Seconds a client is told to wait after a 429.
pub const RETRY_AFTER_S: u64 = 1;

/// An error as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, as a dotted path (`response_format.json_schema`).
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 for a request that cannot be run as written.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    pub fn unknown_model(name: &str, loaded: &[String]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{name}` does not exist here (loaded: {})",
                loaded.join(", ")
            ),
        )
        .with_param("model");
        e.code = Some("model_not_found");
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.code = Some("overloaded");
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// 403: a cross-origin request from an origin the server was not told to allow.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    /// 408: the client stopped sending its request.
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            message,
        )
    }

    /// 415: a body that is not declared as JSON.
    pub fn not_json(content_type: &str) -> Self {
        let mut e = Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "the request body must be sent with `Content-Type: application/json`, not {content_type}"
            ),
        );
        e.code = Some("unsupported_media_type");
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// 499 (nginx's "client closed request"): the client went away, so nobody reads it;
    /// it exists so a cancelled request is logged as what it was.
    pub fn cancelled() -> Self {
        Self::new(
            StatusCode::from_u16(499).expect("499 is a valid status"),
            "invalid_request_error",
            "the request was cancelled before it finished",
        )
    }

    /// Maps an engine error by its variant. `prompt_param` names the field the prompt came
    /// from (`messages` or `prompt`), for errors about the prompt.
    pub fn from_engine(e: &EngineError, prompt_param: &str) -> Self {
        match e {
            EngineError::Validation(Validation::UnknownModel { name, loaded }) => {
                Self::unknown_model(name, loaded)
            }
            EngineError::Validation(v) => {
                let param = match v.field() {
                    "prompt" => prompt_param,
                    field => field,
                };
                let err = Self::field(param, v.to_string());
                match v {
                    Validation::PromptTooLong { .. } => err.with_code("context_length_exceeded"),
                    _ => err,
                }
            }
            EngineError::Template(_)
            | EngineError::TemplateOverLimit { .. }
            | EngineError::NoChatTemplate(_) => {
                Self::invalid(e.to_string()).with_param(prompt_param)
            }
            EngineError::Tokenizer(m) => Self::invalid(format!("tokenizer: {m}")),
            EngineError::Overloaded { waiting, limit } => Self::overloaded(format!(
                "the server is overloaded ({waiting} requests are waiting, limit {limit}); retry later"
            )),
            EngineError::OutOfMemory(short) => Self::unavailable(kv_shortage_message(short)),
            EngineError::Cancelled => Self::cancelled(),
            EngineError::DeadlineExceeded { after } => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!(
                    "the server's request timeout ({}s) passed before the answer was complete",
                    after.as_secs_f64()
                ),
            )
            .with_code("timeout"),
            EngineError::Internal(i) if i.engine_stopped() => Self::unavailable(format!(
                "{i}: no request can run; restart the server"
            )),
            // Ours, not the client's: loading, configuration, a failed forward pass.
            other => Self::internal(format!(
                "internal server error (not a problem with the request): {other}"
            )),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// The client's side of a KV cache shortage: what did not fit, by how much, and what the
/// client can change (the server's cache size is the operator's).
fn kv_shortage_message(short: &KvShortage) -> String {
    match *short {
        KvShortage::Prompt {
            tokens,
            needed_blocks,
            cache_blocks,
            block_size,
        } => format!(
            "out of KV cache memory: the prompt's {tokens} tokens need {needed_blocks} blocks \
             of {block_size} tokens, and the server's whole KV cache for this model has \
             {cache_blocks} ({} tokens); send a shorter prompt",
            cache_blocks * block_size
        ),
        KvShortage::Sequence {
            tokens,
            needed_blocks,
            cache_blocks,
            block_size,
        } => format!(
            "out of KV cache memory: the sequence grew to {tokens} tokens, which need \
             {needed_blocks} blocks of {block_size} tokens, and the server's whole KV cache for \
             this model has {cache_blocks} ({} tokens); ask for a smaller `max_tokens` or send \
             a shorter prompt",
            cache_blocks * block_size
        ),
        KvShortage::Reserve {
            tokens,
            needed_blocks,
            free_blocks,
            block_size,
        } => format!(
            "out of KV cache memory: {tokens} tokens need {needed_blocks} more blocks of \
             {block_size} tokens, and {free_blocks} are free; retry later"
        ),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        let headers = r.headers_mut();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use forgeline_engine::error::{ConfigError, Internal};
    use std::sync::Arc;
    use std::time::Duration;

    fn map(e: impl Into<EngineError>) -> ApiError {
        ApiError::from_engine(&e.into(), "messages")
    }

    #[test]
    fn a_too_long_prompt_is_400_on_the_prompt_field_with_openai_code() {
        let e = map(Validation::PromptTooLong {
            tokens: 9000,
            context: 8192,
            model: "m".into(),
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.kind, "invalid_request_error");
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("9000 tokens"), "{}", e.message);
    }

    #[test]
    fn every_validation_error_is_400_naming_its_field() {
        let cases: [(Validation, &str); 13] = [
            (Validation::EmptyPrompt, "messages"),
            (Validation::PromptToken { token: 7, vocab: 5 }, "messages"),
            (Validation::MaxTokensZero, "max_tokens"),
            (
                Validation::MaxTokens {
                    requested: 9000,
                    prompt: 12,
                    context: 8192,
                },
                "max_tokens",
            ),
            (Validation::Temperature(-1.0), "temperature"),
            (Validation::TopP(2.0), "top_p"),
            (Validation::MinP(1.0), "min_p"),
            (Validation::RepetitionPenalty(0.0), "repetition_penalty"),
            (Validation::DryBase(0.5), "dry_base"),
            (Validation::DryPenaltyLastN(-3), "dry_penalty_last_n"),
            (Validation::Deadline, "deadline"),
            (
                Validation::Constraint {
                    kind: "JSON schema",
                    reason: "unknown keyword".into(),
                },
                "response_format",
            ),
            (
                Validation::ConstrainedDecoding("no token allowed".into()),
                "response_format",
            ),
        ];
        for (v, param) in cases {
            let e = map(v.clone());
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{v:?}");
            assert_eq!(e.param.as_deref(), Some(param), "{v:?}");
            assert_eq!(e.message, v.to_string());
            // Only a prompt longer than the context is `context_length_exceeded`.
            assert_eq!(e.code, None, "{v:?}");
        }
    }

    #[test]
    fn an_unknown_model_is_404_model_not_found() {
        let e = map(Validation::UnknownModel {
            name: "gpt-9".into(),
            loaded: vec!["a".into(), "b".into()],
        });
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.param.as_deref(), Some("model"));
        assert_eq!(e.code, Some("model_not_found"));
        assert!(e.message.contains("gpt-9") && e.message.contains("a, b"));
    }

    #[test]
    fn load_maps_to_429_with_retry_after_and_503() {
        let e = map(EngineError::Overloaded {
            waiting: 9,
            limit: 8,
        });
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.kind, "rate_limit_error");
        assert!(e.message.contains("limit 8"), "{}", e.message);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");

        let e = map(EngineError::OutOfMemory(KvShortage::Sequence {
            tokens: 300,
            needed_blocks: 19,
            cache_blocks: 16,
            block_size: 16,
        }));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.kind, "server_error");
        assert_eq!(
            e.message,
            "out of KV cache memory: the sequence grew to 300 tokens, which need 19 blocks of \
             16 tokens, and the server's whole KV cache for this model has 16 (256 tokens); ask \
             for a smaller `max_tokens` or send a shorter prompt"
        );
        let e = map(EngineError::OutOfMemory(KvShortage::Prompt {
            tokens: 300,
            needed_blocks: 19,
            cache_blocks: 16,
            block_size: 16,
        }));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.message,
            "out of KV cache memory: the prompt's 300 tokens need 19 blocks of 16 tokens, and \
             the server's whole KV cache for this model has 16 (256 tokens); send a shorter prompt"
        );
        let e = map(EngineError::OutOfMemory(KvShortage::Reserve {
            tokens: 40,
            needed_blocks: 2,
            free_blocks: 1,
            block_size: 16,
        }));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.message,
            "out of KV cache memory: 40 tokens need 2 more blocks of 16 tokens, and 1 are free; \
             retry later"
        );
        for stopped in [
            Internal::EngineStopped,
            Internal::EngineThreadStopped,
            Internal::StreamEnded,
        ] {
            let e = map(stopped);
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE, "{e}");
            assert_eq!(e.kind, "server_error");
        }
    }

    #[test]
    fn deadlines_are_504_and_cancellation_499() {
        let e = map(EngineError::DeadlineExceeded {
            after: Duration::from_secs(30),
        });
        assert_eq!(e.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(e.message.contains("30s"), "{}", e.message);
        assert_eq!(map(EngineError::Cancelled).status.as_u16(), 499);
    }

    #[test]
    fn our_failures_are_500_and_say_so() {
        let forward = Internal::ForwardPass(Arc::new(EngineError::io(
            "/m.gguf",
            std::io::Error::other("short read"),
        )));
        for e in [
            EngineError::from(forward),
            Internal::LockPoisoned.into(),
            ConfigError::NoModels.into(),
            EngineError::bad_model("/m.gguf", "truncated"),
        ] {
            let text = e.to_string();
            let e = map(e);
            assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
            assert_eq!(e.kind, "server_error");
            assert_eq!(e.param, None);
            assert!(e.message.contains("not a problem with the request"));
            assert!(e.message.ends_with(&text), "{}", e.message);
        }
    }

    #[test]
    fn the_body_is_openai_shaped_and_429_says_when_to_retry() {
        let e = ApiError::field("temperature", "`temperature` must be a number");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "`temperature` must be a number",
                "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        let r = ApiError::overloaded("busy").into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::unauthorized("no key").into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
