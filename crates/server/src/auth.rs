//! Bearer-token authentication, and the rule that an open server only listens on loopback.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The key clients must send as `Authorization: Bearer <key>`.
#[derive(Clone)]
pub struct ApiKey(Arc<[u8]>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// A key from the contents of a key file: surrounding whitespace is not part of it.
    pub fn new(text: &str) -> Result<Self, String> {
        let key = text.trim();
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the API key must be one line without spaces".into());
        }
        Ok(Self(key.as_bytes().into()))
    }

    /// Compares in time that depends only on the lengths, not on where the bytes differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let key = &self.0;
        let mut diff = u8::from(key.len() != candidate.len());
        for i in 0..key.len().max(candidate.len()) {
            let a = key.get(i).copied().unwrap_or(0);
            let b = candidate.get(i).copied().unwrap_or(0xff);
            diff |= std::hint::black_box(a ^ b);
        }
        std::hint::black_box(diff) == 0
    }
}

/// Middleware: 401 unless the request carries the key.
pub async fn require_key(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| v.strip_prefix(b"Bearer "));
    match given {
        None => ApiError::unauthorized(
            "missing API key: send it as the header `Authorization: Bearer <key>`",
        )
        .into_response(),
        Some(k) if !key.matches(k) => ApiError::unauthorized("invalid API key").into_response(),
        Some(_) => next.run(req).await,
    }
}

/// Refuses to serve without a key on an address other hosts can reach, unless the operator
/// said so explicitly.
pub fn check_exposure(host: IpAddr, has_key: bool, insecure_no_auth: bool) -> Result<(), String> {
    if host.is_loopback() || has_key || insecure_no_auth {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {host} without authentication: anyone who can reach it could \
         use the models. Give --api-key-file FILE, or --insecure-no-auth to serve openly"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let k = ApiKey::new("  s3cret\n").unwrap();
        assert!(k.matches(b"s3cret"));
        assert!(!k.matches(b"s3cres"));
        assert!(!k.matches(b"s3cret2"));
        assert!(!k.matches(b"s3cre"));
        assert!(!k.matches(b""));
        assert!(ApiKey::new(" \n").is_err());
        assert!(ApiKey::new("two words").is_err());
    }

    #[test]
    fn an_open_server_stays_on_loopback_unless_told() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(check_exposure(lo, false, false).is_ok());
        assert!(check_exposure("::1".parse().unwrap(), false, false).is_ok());
        let e = check_exposure(any, false, false).unwrap_err();
        assert!(e.contains("--api-key-file") && e.contains("--insecure-no-auth"));
        assert!(check_exposure(any, true, false).is_ok());
        assert!(check_exposure(any, false, true).is_ok());
    }
}
