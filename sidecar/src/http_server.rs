//! The HTTP server under the router, with the limits `axum::serve` lacks: a deadline for
//! reading a request's headers (idle keep-alive connections included), a cap on open
//! connections, and a bounded graceful stop, so neither an idle nor a slow client can hold the
//! sidecar's shutdown (and the `cancel_all` that must follow it).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// How long a client may take to send a request's headers, counted from when the
    /// connection is ready for the next request (an idle keep-alive connection is closed then).
    pub header_read_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long connections may finish their requests after the stop was asked.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the open connections
/// finish for at most `limits.shutdown_grace` (idle ones are closed at once) and returns.
///
/// # Errors
/// None so far: accept errors (such as running out of descriptors) are logged and retried.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: HttpLimits,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(
                "connections still open {:.0} s after the stop: not waiting for them",
                limits.shutdown_grace.as_secs_f64()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    async fn start(
        limits: HttpLimits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            serve(
                listener,
                router,
                async move {
                    let _ = stopped.await;
                },
                limits,
            )
            .await
            .expect("serve");
        });
        (addr, stop, served)
    }

    /// Reads until the server closes the connection; a hang guard, not a timing goal.
    fn read_to_close(mut s: std::net::TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .expect("closed by the server, not timed out");
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let (addr, _stop, _served) = start(HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        })
        .await;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .expect("partial head");
        let got = tokio::task::spawn_blocking(move || read_to_close(s))
            .await
            .expect("join");
        assert!(!String::from_utf8_lossy(&got).contains("ok"));
    }

    /// Issue 14: idle connections held graceful shutdown forever, so `cancel_all` never ran.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_half_sent_connections_do_not_hold_the_stop() {
        let (addr, stop, served) = start(HttpLimits {
            shutdown_grace: Duration::from_millis(500),
            ..HttpLimits::default()
        })
        .await;
        // One keep-alive connection after a request, one in the middle of its headers.
        let mut idle = std::net::TcpStream::connect(addr).expect("connect");
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut buf = [0u8; 256];
        let n = idle.read(&mut buf).expect("response");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let mut half = std::net::TcpStream::connect(addr).expect("connect");
        half.write_all(b"GET / HTTP/1.1\r\n").expect("partial head");
        stop.send(()).expect("stop");
        tokio::time::timeout(Duration::from_secs(60), served)
            .await
            .expect("serve returns although clients never finish")
            .expect("join");
        drop((idle, half));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let (addr, _stop, _served) = start(HttpLimits {
            max_connections: 1,
            ..HttpLimits::default()
        })
        .await;
        let mut first = std::net::TcpStream::connect(addr).expect("connect");
        first
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut buf = [0u8; 256];
        assert!(first.read(&mut buf).expect("response") > 0);
        // The second connection is accepted by the kernel but not served while the first holds
        // the only slot; closing the first frees it.
        let mut second = std::net::TcpStream::connect(addr).expect("connect");
        second
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        second
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert!(second.read(&mut buf).is_err(), "served beyond the cap");
        drop(first);
        let got = tokio::task::spawn_blocking(move || read_to_close(second))
            .await
            .expect("join");
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    }
}
