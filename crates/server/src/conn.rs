//! The accept loop: each connection is served by hyper's HTTP/1 with a timer, so a client
//! must send a request's head within the header timeout (also how long an idle keep-alive
//! connection stays open), and a client that stops reading its answer is dropped after the
//! idle timeout. At most `max_connections` are served at once: past that the loop stops
//! accepting, so new clients wait in the kernel's backlog until one ends (they are not
//! refused). On shutdown every connection finishes the request it is serving and closes.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;

/// What bounds one connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// The connections being served; `close` asks each to end after its current request.
pub struct Connections {
    tasks: JoinSet<()>,
    close: watch::Sender<bool>,
}

impl Connections {
    pub fn close(&self) {
        self.close.send_replace(true);
    }

    /// Resolves when every connection has ended.
    pub async fn drained(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    pub fn open(&self) -> usize {
        self.tasks.len()
    }

    /// Drops the connections still open.
    pub fn abort(&mut self) {
        self.tasks.abort_all();
    }
}

/// Accepts and serves connections until `shutdown` resolves; returns those still open.
pub async fn accept_until(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> Connections {
    let (close, closing) = watch::channel(false);
    let mut conns = Connections {
        tasks: JoinSet::new(),
        close,
    };
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut shutdown = pin!(shutdown);
    loop {
        // A slot first: when all are taken, clients wait in the backlog rather than
        // being accepted into a connection nobody serves.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        while conns.tasks.try_join_next().is_some() {}
        match accepted {
            Ok((tcp, _peer)) => {
                let svc = TowerToHyperService::new(router.clone());
                conns
                    .tasks
                    .spawn(serve_one(tcp, svc, limits, closing.clone(), permit));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    conns
}

async fn serve_one(
    tcp: TcpStream,
    svc: TowerToHyperService<Router>,
    limits: ConnLimits,
    mut closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(StallGuard::new(tcp, limits.idle_timeout));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(io, svc));
    tokio::select! {
        r = conn.as_mut() => return log_end(r),
        _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
    }
    log_end(conn.await);
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!("connection ended: {e}");
    }
}

/// A socket whose writes fail once they have waited `timeout` for the client to read: a
/// client that stops reading an answer cannot hold its connection forever.
pub struct StallGuard<T> {
    io: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    pub fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            stalled: None,
        }
    }

    fn check<R>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if p.is_ready() {
            self.stalled = None;
            return p;
        }
        let timeout = self.timeout;
        let sleep = (self.stalled).get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Reads may wait: a client waits quietly while its answer is generated.
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, p)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_the_reader_never_takes_fails_after_the_timeout() {
        // A 64-byte pipe nobody reads: the second write waits forever without the guard.
        let (a, _b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, Duration::from_millis(50));
        g.write_all(&[0; 64]).await.unwrap();
        let t = std::time::Instant::now();
        let e = g.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn writes_that_progress_are_not_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut n = 0;
            let mut buf = [0; 16];
            while n < 4096 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                n += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
        });
        g.write_all(&[1; 4096]).await.unwrap();
        reader.await.unwrap();
    }
}
