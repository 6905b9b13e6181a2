//! A small HTTP/1 client for `forgeline bench serve` and the server's tests: one connection
//! per request, JSON bodies, and server-sent events read as they arrive.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] axum::http::Error),
}

pub type ClientResult<T> = Result<T, ClientError>;

/// Talks to one server.
#[derive(Clone, Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    api_key: Option<String>,
}

/// A whole response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            api_key: None,
        }
    }

    /// Sends `Authorization: Bearer <key>` with every request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    pub async fn get(&self, path: &str) -> ClientResult<HttpResponse> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> ClientResult<HttpResponse> {
        self.request(Method::POST, path, Some(body.to_string().into()))
            .await
    }

    pub async fn delete(&self, path: &str) -> ClientResult<HttpResponse> {
        self.request(Method::DELETE, path, None).await
    }

    /// Any method, with a raw body (sent as JSON).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> ClientResult<HttpResponse> {
        let (resp, _conn) = self.send(method, path, body).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// POSTs `body` and returns the response as it arrives: its status, then its SSE events.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> ClientResult<EventStream> {
        let (resp, conn) = self
            .send(Method::POST, path, Some(body.to_string().into()))
            .await?;
        Ok(EventStream::new(resp, conn))
    }

    /// GETs a stream of SSE events.
    pub async fn get_stream(&self, path: &str) -> ClientResult<EventStream> {
        let (resp, conn) = self.send(Method::GET, path, None).await?;
        Ok(EventStream::new(resp, conn))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> ClientResult<(hyper::Response<Incoming>, Connection)> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let conn = Connection(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string());
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(k) = &self.api_key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        Ok((sender.send_request(req).await?, conn))
    }
}

/// The task driving one connection; dropping it closes the connection at once (a client
/// that goes away mid-answer).
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response body read as server-sent events. Dropping it closes the connection.
pub struct EventStream {
    pub status: StatusCode,
    body: Incoming,
    buf: Vec<u8>,
    _conn: Connection,
}

impl EventStream {
    fn new(resp: hyper::Response<Incoming>, conn: Connection) -> Self {
        Self {
            status: resp.status(),
            body: resp.into_body(),
            buf: Vec::new(),
            _conn: conn,
        }
    }

    /// The next event's data (its `data:` lines joined), None at the end of the body.
    /// Comments (keep-alives) are skipped.
    pub async fn next_data(&mut self) -> ClientResult<Option<String>> {
        loop {
            if let Some(end) = find(&self.buf, b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The rest of the body as one string (for a response that turned out not to be SSE).
    pub async fn rest(mut self) -> ClientResult<String> {
        let more = self.body.collect().await?.to_bytes();
        self.buf.extend_from_slice(&more);
        Ok(String::from_utf8_lossy(&self.buf).into_owned())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
