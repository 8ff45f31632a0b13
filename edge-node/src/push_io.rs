//! A push listener's connection as the writers (`push_fanout`) see it: an upgraded WebSocket
//! connection, or a WebTransport session's stream (`push_wt`). Both carry the same bytes.

use crate::push_wt::WebTransportListener;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
