//! The connection guard: the proxy runs behind [`Guarded`], a Pingora
//! [`ServerApp`] that admits each client connection into a slot among
//! `limits.max_connections` (one more is answered 503 and closed, lingering
//! briefly), hands the proxy the connection as a [`Timed`] stream, and
//! serves plain HTTP/1.1 connections one request after the other, waiting
//! between two of them itself. What the stream does with the head deadline
//! and the lingering close, and the counts kept of every connection, are
//! `connections`'.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};

use crate::proxy::connections::{closing_response, linger, Connections, Timed};
use crate::proxy::drain::Stopping;
use crate::runtime::Live;

/// How long a connection turned away (beyond `max_connections`) is read from
/// after its 503: it holds no slot, so it is kept short.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// A [`ServerApp`] (the proxy) behind the connection limits.
pub struct Guarded<A> {
    app: Arc<A>,
    live: Arc<Live>,
    connections: Arc<Connections>,
    /// The drain's start, handed to the proxy as its shutdown signal:
    /// Pingora's own comes only once the drain is over.
    draining: ShutdownWatch,
}

impl<A> Guarded<A> {
    pub fn new(
        app: A,
        live: Arc<Live>,
        connections: Arc<Connections>,
        stopping: Arc<Stopping>,
    ) -> Self {
        Guarded {
            app: Arc::new(app),
            live,
            connections,
            draining: stopping.watch(),
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let shutdown = &self.draining;
        // min_version = "1.3": the certificate resolver turns away clients
        // that offer no TLS 1.3 suite, but a client may list them and still
        // speak only 1.2; the version negotiated is what counts.
        let snapshot = self.live.load_full();
        if snapshot.tls13_only
            && stream
                .get_ssl_digest()
                .is_some_and(|d| !d.version.contains("1_3") && !d.version.contains("1.3"))
        {
            return None;
        }
        if super::parts::off(super::parts::Part::Guard) {
            self.serve_by_pingora(stream, shutdown).await;
            return None;
        }
        let limits = &snapshot.limits;
        let max = limits.max_connections;
        let Some(slot) = self.connections.admit(max) else {
            if self.connections.refusals_logged.allow() {
                log::info!(
                    "refusing new client connections: limits.max_connections ({max}) are open; {} refused so far",
                    self.connections.refused()
                );
            }
            refuse(
                stream,
                "503 Service Unavailable",
                "too many open connections; try again in a moment\n",
            )
            .await;
            return None;
        };
        let http2 = stream.selected_alpn_proto() == Some(ALPN::H2);
        let tls = stream.get_ssl_digest().is_some();
        let mut timed = Timed::new(stream, limits, slot);
        if http2 {
            timed.untimed();
        }
        let stream: Stream = Box::new(timed);
        let h2c = self.app.server_options().is_some_and(|o| o.h2c);
        if !tls && !h2c {
            self.serve_http1(stream, shutdown).await;
            return None;
        }
        // TLS (ALPN) and h2c: Pingora tells the protocols apart and serves
        // every request of the connection, still inside the slot.
        self.serve_by_pingora(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.app).await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Guarded<A> {
    /// The connection served by Pingora's own loop: it tells the protocols
    /// apart and serves every request of the connection in one call; any
    /// stream it hands back is served again here.
    async fn serve_by_pingora(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut next = ServerApp::process_new(&self.app, stream, shutdown).await;
        while let Some(stream) = next {
            next = ServerApp::process_new(&self.app, stream, shutdown).await;
        }
    }

    /// A plain HTTP/1.1 connection, one request after the other, as
    /// Pingora's own loop serves it, but for the wait between two requests:
    /// that happens here, holding the socket and nothing of Pingora's. (A
    /// request's state in Pingora takes some 25 KiB, and Pingora keeps it
    /// for as long as a kept-alive connection is idle.) The wait costs no
    /// system call: the bytes that end it are the ones the proxy reads.
    async fn serve_http1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut session = ServerSession::new_http1(stream);
        // Pingora's default; `early_request_filter` sets the configured one.
        session.set_keepalive((!*shutdown.borrow()).then_some(60));
        let mut reused = self.app.process_new_http(session, shutdown).await;
        let mut idle_timer = None;
        while let Some((mut stream, settings)) = reused.map(ReusedHttpStream::consume) {
            let pipelined = settings.as_ref().is_some_and(|s| !nothing_pipelined(s));
            if !pipelined && !self.next_request_comes(&mut stream, &mut idle_timer).await {
                return;
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            reused = self.app.process_new_http(session, shutdown).await;
        }
    }

    /// Waits until the client sends its next request, for at most
    /// `limits.keepalive_timeout`; what came is read ahead and left for the
    /// proxy to read (see [`Timed`]'s `try_peek`). `false`: the client
    /// closed or stayed silent. (A server that is stopping drops its idle
    /// connections with its runtime, as Pingora's own wait does.)
    ///
    /// The waits of a connection share one timer (`timer`), set at its first
    /// wait: a later wait finds it set for an earlier deadline, and moves it
    /// on only when it fires, so a wait on a busy connection sets no timer.
    async fn next_request_comes(
        &self,
        stream: &mut Stream,
        timer: &mut Option<Pin<Box<Sleep>>>,
    ) -> bool {
        let idle = self.live.load().limits.keepalive_timeout;
        let deadline = Instant::now() + idle.max(Duration::from_secs(1));
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            // keepalive_timeout was made shorter by a reload.
            timer.as_mut().reset(deadline);
        }
        let mut first = [0u8; 1];
        loop {
            tokio::select! {
                biased;
                peeked = stream.try_peek(&mut first) => return matches!(peeked, Ok(true)),
                () = timer.as_mut() => {
                    if timer.deadline() >= deadline {
                        return false;
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// Whether Pingora holds no bytes of a next request read along with the last
/// one (a pipelined request): only then may the wait for the next request
/// watch the socket. Pingora 0.9 keeps those bytes in a private field of
/// `HttpPersistentSettings`, readable only through its `Debug` form; any
/// other form than the one expected counts as "maybe", and Pingora then
/// waits as it would without this (the unit test below pins the form). The
/// form is read piece by piece as it is written, and the writing stops at
/// the field: formatting it whole would cost more than the rest of the wait.
fn nothing_pipelined(settings: &HttpPersistentSettings) -> bool {
    use std::fmt::{self, Write as _};
    /// The field's name comes as one piece, then `: `, then its value.
    #[derive(Default)]
    struct Field {
        named: bool,
        none: Option<bool>,
    }
    impl fmt::Write for Field {
        fn write_str(&mut self, piece: &str) -> fmt::Result {
            match (self.named, piece) {
                (false, "pipelined_prefix") => self.named = true,
                (false, _) | (true, ": ") => {}
                (true, value) => {
                    self.none = Some(value.starts_with("None"));
                    return Err(fmt::Error); // seen: stop formatting
                }
            }
            Ok(())
        }
    }
    let mut field = Field::default();
    let _ = write!(field, "{settings:?}");
    field.none == Some(true)
}

/// Answers `status` with `body` and closes, reading (and discarding) what
/// the client sends for a moment first.
async fn refuse(mut stream: Stream, status: &str, body: &str) {
    let answer = closing_response(status, "Retry-After: 1\r\n", body);
    if stream.write_all(&answer).await.is_ok() {
        linger(stream, REFUSAL_LINGER, REFUSAL_LINGER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipelined_request_is_seen_in_the_persistent_settings() {
        let session = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::new())));
        let mut settings = HttpPersistentSettings::for_session(&session);
        settings.set_user_context(Box::new("pipelined_prefix: None"));
        assert!(nothing_pipelined(&settings));
        settings.set_pipelined_prefix(bytes::BytesMut::from(
            &b"GET /?pipelined_prefix: None HTTP/1.1\r\n"[..],
        ));
        assert!(!nothing_pipelined(&settings));
    }
}
