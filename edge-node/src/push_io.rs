//! A push listener's connection as the writers (`push_fanout`) see it: an upgraded WebSocket
//! connection, or a WebTransport session's stream ([`WebTransportListener`], opened by
//! `push_wt`). Both carry the same bytes.

use amphi_protocol::https::ConnectionPermit;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use web_transport_quinn::{SendStream, Session};

/// How long a closed WebTransport listener's stream may take to deliver its last bytes (the
/// close frame).
const LINGER: Duration = Duration::from_secs(2);

/// A push listener's connection.
pub(crate) enum PushIo {
    /// `GET /v1/rooms/{room}/push` upgraded to a WebSocket.
    WebSocket(TokioIo<hyper::upgrade::Upgraded>),
    /// A WebTransport session's unidirectional stream.
    WebTransport(Box<WebTransportListener>),
}

impl AsyncRead for PushIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PushIo::WebSocket(io) => Pin::new(io).poll_read(cx, buf),
            PushIo::WebTransport(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PushIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PushIo::WebSocket(io) => Pin::new(io).poll_write(cx, buf),
            PushIo::WebTransport(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PushIo::WebSocket(io) => Pin::new(io).poll_flush(cx),
            PushIo::WebTransport(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PushIo::WebSocket(io) => Pin::new(io).poll_shutdown(cx),
            PushIo::WebTransport(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A push listener's WebTransport session, as the writers see it: writes go to its stream;
/// reads never yield bytes and end (EOF) when the session closes.
pub(crate) struct WebTransportListener {
    send: Option<SendStream>,
    session: Session,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    _permit: ConnectionPermit,
}

impl WebTransportListener {
    pub(crate) fn new(session: Session, send: SendStream, permit: ConnectionPermit) -> Self {
        let watched = session.clone();
        WebTransportListener {
            send: Some(send),
            session,
            closed: Box::pin(async move {
                watched.closed().await;
            }),
            _permit: permit,
        }
    }
}

impl AsyncRead for WebTransportListener {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Nothing is read from a listener; a closed session reads as the end of the stream.
        self.closed.as_mut().poll(cx).map(Ok)
    }
}

impl AsyncWrite for WebTransportListener {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.send.as_mut() {
            Some(send) => Pin::new(send).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.as_mut() {
            Some(send) => Pin::new(send).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.as_mut() {
            Some(send) => Pin::new(send).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl Drop for WebTransportListener {
    /// Finish the stream and keep the session until its last bytes (a close frame) are
    /// acknowledged, for at most [`LINGER`]: dropping the session at once would close the
    /// connection before they leave.
    fn drop(&mut self) {
        let Some(mut send) = self.send.take() else {
            return;
        };
        let _ = send.finish();
        let session = self.session.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(LINGER, send.stopped()).await;
                session.close(0, b"");
            });
        }
    }
}
