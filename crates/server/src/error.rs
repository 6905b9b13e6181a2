//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! that goes with them, and how engine errors map onto them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
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

    /// Maps an engine error. `prompt_param` names the field the prompt came from (`messages`
    /// or `prompt`), for errors about the prompt.
    pub fn from_engine(e: &EngineError, prompt_param: &str) -> Self {
        match e {
            EngineError::InvalidRequest(m) => {
                let mut err = Self::invalid(m.clone());
                err.param = param_of(m, prompt_param);
                if err.param.as_deref() == Some(prompt_param) && m.contains("tokens") {
                    err.code = Some("context_length_exceeded");
                }
                err
            }
            EngineError::Template(m) => {
                Self::invalid(format!("chat template: {m}")).with_param(prompt_param)
            }
            EngineError::Tokenizer(m) => Self::invalid(format!("tokenizer: {m}")),
            EngineError::Overloaded(m) => {
                Self::overloaded(format!("the server is overloaded ({m}); retry later"))
            }
            EngineError::OutOfMemory(m) => {
                Self::unavailable(format!("out of KV cache memory: {m}"))
            }
            other => Self::internal(other.to_string()),
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

/// The request field an engine message is about: the first backticked request parameter it
/// names, the prompt when it talks about the prompt, `response_format` for constraint errors.
fn param_of(message: &str, prompt_param: &str) -> Option<String> {
    const PARAMS: [&str; 5] = ["max_tokens", "temperature", "top_p", "seed", "stop"];
    let named = message
        .split('`')
        .skip(1)
        .step_by(2)
        .find(|w| PARAMS.contains(w));
    if let Some(p) = named {
        return Some(p.to_string());
    }
    if [
        "JSON schema",
        "JSON:",
        "regex",
        "Lark",
        "constrained decoding",
    ]
    .iter()
    .any(|k| message.starts_with(k))
    {
        return Some("response_format".into());
    }
    if message.contains("prompt") {
        return Some(prompt_param.to_string());
    }
    None
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
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

    #[test]
    fn engine_errors_map_to_status_and_field() {
        let too_long = EngineError::InvalidRequest(
            "the prompt has 9000 tokens; model `m` holds 8192 in its context, including the answer"
                .into(),
        );
        let e = ApiError::from_engine(&too_long, "messages");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert_eq!(e.code, Some("context_length_exceeded"));

        let e = ApiError::from_engine(
            &EngineError::InvalidRequest(
                "`max_tokens` 9000 plus the prompt's 12 tokens exceeds the context of 8192".into(),
            ),
            "prompt",
        );
        assert_eq!(e.param.as_deref(), Some("max_tokens"));

        let e = ApiError::from_engine(
            &EngineError::InvalidRequest("JSON schema: unknown keyword".into()),
            "messages",
        );
        assert_eq!(e.param.as_deref(), Some("response_format"));

        let e = ApiError::from_engine(&EngineError::Overloaded("9 waiting".into()), "prompt");
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.kind, "rate_limit_error");

        let e = ApiError::from_engine(&EngineError::OutOfMemory("x".into()), "prompt");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
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
