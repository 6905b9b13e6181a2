//! `JsonBody`: a request body read only when it is declared as JSON (so a web page's
//! cross-site `text/plain` or form POST, which a browser sends without asking, is refused
//! with 415 before anything runs), within the body limit (413), and from a client that keeps
//! sending (408 when it stalls for the idle timeout).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Body as _;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};

/// The raw bytes of a JSON request body.
pub struct JsonBody(pub Bytes);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &AppState) -> ApiResult<Self> {
        require_json(req.headers())?;
        let (limit, idle) = (app.config.body_limit, app.config.idle_timeout);
        read_body(req.into_body(), limit, idle).await.map(JsonBody)
    }
}

/// `application/json` or an `application/*+json` type, with no charset but UTF-8.
pub fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::not_json("a body without a Content-Type"));
    };
    let shown = || format!("`{}`", String::from_utf8_lossy(v.as_bytes()));
    let text = v.to_str().map_err(|_| ApiError::not_json(&shown()))?;
    let mut parts = text.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    let utf8 = parts.all(|p| match p.split_once('=') {
        Some((k, v)) if k.trim().eq_ignore_ascii_case("charset") => {
            let v = v.trim().trim_matches('"');
            v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    });
    if json && utf8 {
        Ok(())
    } else {
        Err(ApiError::not_json(&shown()))
    }
}

/// The whole body, refused past `limit` bytes or when no data comes for `idle`.
pub async fn read_body(mut body: Body, limit: usize, idle: Duration) -> ApiResult<Bytes> {
    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    if body.size_hint().lower() > limit_u64 {
        return Err(ApiError::too_large(limit));
    }
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| {
                ApiError::timed_out(format!(
                    "the client sent no part of the request body for {} s",
                    idle.as_secs_f64()
                ))
            })?;
        let Some(frame) = frame else { break };
        let frame =
            frame.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > limit {
                return Err(ApiError::too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    fn ct(v: &str) -> ApiResult<()> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
        require_json(&h)
    }

    #[test]
    fn only_json_content_types_pass() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/vnd.api+json",
        ] {
            assert!(ct(ok).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/json; charset=latin1",
            "text/json+json",
            "",
        ] {
            let e = ct(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
            assert!(e.message.contains(&format!("`{bad}`")), "{}", e.message);
        }
        let e = require_json(&HeaderMap::new()).unwrap_err();
        assert!(
            e.message.contains("without a Content-Type"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn bodies_are_capped_and_stalls_time_out() {
        let idle = Duration::from_millis(100);
        let b = read_body(Body::from("{}"), 2, idle).await.unwrap();
        assert_eq!(&b[..], b"{}");
        let e = read_body(Body::from("{ }"), 2, idle).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);

        // A streamed body that sends one chunk and then nothing.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tx.send(Ok(Bytes::from_static(b"{"))).await.unwrap();
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
            );
        let e = read_body(Body::from_stream(stream), 100, idle)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_TIMEOUT);
        drop(tx);
    }
}
