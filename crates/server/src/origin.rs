//! Cross-origin requests. A browser tags every cross-site request with `Origin`; the server
//! refuses (403) any that carries an origin it was not told to allow, so a web page cannot
//! drive a keyless loopback server. Requests without `Origin` (curl, SDKs) pass. An allowed
//! origin gets CORS headers and its preflight `OPTIONS` answered; no other response carries
//! CORS headers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The origins whose pages may call the API (`--allowed-origin`); none by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    any: bool,
    /// Lowercase `scheme://host[:port]`.
    list: Vec<String>,
}

impl AllowedOrigins {
    /// From `scheme://host[:port]` values, or `*` for any origin.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let mut out = Self::default();
        for v in values {
            let v = v.as_ref().trim();
            if v == "*" {
                out.any = true;
                continue;
            }
            let rest = v
                .strip_prefix("http://")
                .or_else(|| v.strip_prefix("https://"))
                .ok_or_else(|| {
                    format!("allowed origin `{v}` must start with http:// or https:// (or be *)")
                })?;
            if rest.is_empty()
                || rest.contains(['/', '?', '#', '@'])
                || rest.contains(char::is_whitespace)
            {
                return Err(format!(
                    "allowed origin `{v}` must be scheme://host[:port], without a path (as a browser sends it)"
                ));
            }
            out.list.push(v.to_ascii_lowercase());
        }
        Ok(out)
    }

    pub fn allows(&self, origin: &str) -> bool {
        self.any || self.list.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    pub fn is_empty(&self) -> bool {
        !self.any && self.list.is_empty()
    }

    /// Whether a request for `host` (a `Host` header: name or address, maybe a port) may
    /// be served by a keyless server: an IP address, `localhost` and its subdomains, or
    /// the host of an allowed origin. A rebinding attacker can only send a domain name.
    pub fn allows_host(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            // [IPv6]:port
            Some(rest) => {
                return rest.split_once(']').is_some_and(|(addr, port)| {
                    addr.parse::<std::net::Ipv6Addr>().is_ok()
                        && (port.is_empty()
                            || port
                                .strip_prefix(':')
                                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
                })
            }
            None => host.rsplit_once(':').map_or(host, |(n, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    n
                } else {
                    host
                }
            }),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name.parse::<std::net::Ipv4Addr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.any
            || self.list.iter().any(|o| {
                let o = o.split_once("://").map_or(o.as_str(), |(_, h)| h);
                let o = o.rsplit_once(':').map_or(o, |(n, _)| n);
                o == name
            })
    }
}

/// Middleware for keyless servers: 403 for a `Host` that is a foreign domain name (DNS
/// rebinding). Requests without `Host` (HTTP/1.0 tools) pass: browsers always send one.
pub async fn check_host(
    State(allowed): State<Arc<AllowedOrigins>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(host) = req.headers().get(header::HOST) {
        if !host.to_str().is_ok_and(|h| allowed.allows_host(h)) {
            let shown = String::from_utf8_lossy(host.as_bytes()).into_owned();
            return ApiError::forbidden(format!(
                "requests for host `{shown}` are refused: a server without an API key answers \
                 only requests for localhost or an IP address (a foreign name is how a web page \
                 reaches it by DNS rebinding); give --api-key-file, or connect by address"
            ))
            .into_response();
        }
    }
    next.run(req).await
}

/// Middleware: 403 for a disallowed `Origin`; CORS headers and preflights for allowed ones.
pub async fn check_origin(
    State(allowed): State<Arc<AllowedOrigins>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        return next.run(req).await;
    };
    let shown = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    if !origin.to_str().is_ok_and(|o| allowed.allows(o)) {
        return ApiError::forbidden(format!(
            "cross-origin requests from `{shown}` are refused; start the server with \
             --allowed-origin {shown} to allow that origin's pages"
        ))
        .into_response();
    }
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("location, retry-after"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_and_match_exactly() {
        let o = AllowedOrigins::parse(&["http://localhost:3000", "https://App.example"]).unwrap();
        assert!(o.allows("http://localhost:3000"));
        assert!(o.allows("https://app.example"));
        assert!(!o.allows("http://localhost:3001"));
        assert!(!o.allows("https://app.example.evil"));
        assert!(!o.allows("null"));
        assert!(AllowedOrigins::default().is_empty());
        assert!(!AllowedOrigins::default().allows("http://localhost"));
        assert!(AllowedOrigins::parse(&["*"]).unwrap().allows("https://x.y"));
        for host in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "a.localhost",
            "[::1]:80",
            "10.0.0.7",
            "127.0.0.1",
        ] {
            assert!(AllowedOrigins::default().allows_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "[::1",
            "[::1]x",
            "localhost.evil",
            "",
            "x:y",
        ] {
            assert!(!AllowedOrigins::default().allows_host(host), "{host}");
        }
        assert!(o.allows_host("app.example:443"));
        for bad in [
            "localhost:3000",
            "http://a/",
            "http://a/path",
            "ftp://a",
            "http://",
            "http://a b",
        ] {
            assert!(AllowedOrigins::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
