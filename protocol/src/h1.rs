//! A plain HTTP/1.1 front for a role's hottest requests.
//!
//! A request of the plain shape (`GET`, HTTP/1.1, no body, no upgrade, no byte range) whose
//! target the role's [`FastFront`] accepts is parsed here (httparse) and answered by the role
//! with one write of the whole response, without hyper's per-request machinery. Anything else
//! (other targets, methods, versions, bodies, upgrades, HTTP/2 prior knowledge) hands the rest
//! of the connection to hyper ([`serve_connection_with`]) with the bytes already read.
//!
//! A role may also hold a request ([`Answer::Held`]) for someone else to answer later, straight
//! into the socket ([`HeldSocket::send`], then [`HeldSocket::settle`]): the packager's blocking
//! playlist reloads, answered by the publication they wait for. The connection's task then goes
//! back to reading; it is not woken when the answer is written, only when the next request
//! arrives, or when the holder left it something to finish (the rest of a response the socket
//! had no room for, a timeout).

#[cfg(doc)]
use crate::https::serve_connection_with;
use crate::https::{accept_loop, Limiter, HEADER_READ_TIMEOUT, SHUTDOWN_GRACE};
use atomic_waker::AtomicWaker;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use socket2::SockRef;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head the front reads before handing the connection to hyper.
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers parsed per request.
const MAX_HEADERS: usize = 32;

/// A request the front answers.
#[derive(Debug, PartialEq, Eq)]
pub struct FastRequest {
    /// Path and query as sent.
    pub uri: Uri,
    /// `Connection: close` was asked for.
    pub close: bool,
    /// The headers the role asked to keep ([`FastFront::kept_headers`]), in order.
    pub headers: HeaderMap,
}

/// What the bytes read so far of a connection hold, as the front sees them.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestHead {
    /// A complete request head of `.1` bytes the front answers.
    Fast(FastRequest, usize),
    /// Not complete yet.
    Partial,
    /// Something for hyper (the whole rest of the connection).
    Other,
}

/// Classify the start of a connection's unread bytes: a plain `GET` whose target `accepts`,
/// keeping the headers named in `kept`. Network-facing: never panics (fuzzed under `fuzz/`).
pub fn parse_request_head(
    buf: &[u8],
    accepts: impl Fn(&str) -> bool,
    kept: &[HeaderName],
) -> RequestHead {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return RequestHead::Partial,
        _ => return RequestHead::Other,
    };
    let (Some("GET"), Some(1), Some(target)) = (req.method, req.version, req.path) else {
        return RequestHead::Other;
    };
    if !accepts(target) {
        return RequestHead::Other;
    }
    let Ok(uri) = Uri::try_from(target) else {
        return RequestHead::Other;
    };
    let mut close = false;
    let mut keep = HeaderMap::new();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return RequestHead::Other;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            // Byte ranges are answered by hyper.
            || name.eq_ignore_ascii_case("range")
        {
            return RequestHead::Other;
        } else if name.eq_ignore_ascii_case("connection") {
            close = h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if let Some(k) = kept.iter().find(|k| name.eq_ignore_ascii_case(k.as_str())) {
            // A value hyper would refuse goes to hyper too.
            let Ok(value) = HeaderValue::from_bytes(h.value) else {
                return RequestHead::Other;
            };
            keep.append(k.clone(), value);
        }
    }
    RequestHead::Fast(
        FastRequest {
            uri,
            close,
            headers: keep,
        },
        len,
    )
}

/// A role's requests answered on the front, and hyper for everything else.
pub trait FastFront: Send + Sync + 'static {
    /// Whether a plain `GET` of `target` (path and query) is answered here.
    fn accepts(&self, target: &str) -> bool;

    /// The request headers [`FastFront::answer`] reads (none by default).
    fn kept_headers(&self) -> &[HeaderName] {
        &[]
    }

    /// Answer one request on `conn`: the whole response ([`write_all`]), or hold it
    /// ([`FastConn::hold`]) for someone to answer later. `Err` when the connection is unusable.
    ///
    /// The future lives in the connection's task for as long as the connection does: keep it
    /// small (box rare paths' large futures), or every connection's task is that large.
    fn answer(
        self: &Arc<Self>,
        conn: &Arc<FastConn>,
        peer: SocketAddr,
        req: FastRequest,
    ) -> impl Future<Output = io::Result<Answer>> + Send;

    /// Serve the rest of a connection from `peer` with hyper ([`serve_connection_with`]),
    /// starting with the bytes already read (`io`).
    fn hand_off(
        self: &Arc<Self>,
        io: Prefixed,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

/// Accept connections on `listener` until `shutdown`; each that `limiter` admits is served by
/// `front` (a refused one is answered 503 without being read). Returns once every connection
/// has finished.
pub async fn serve_fast<F: FastFront>(
    listener: TcpListener,
    front: Arc<F>,
    shutdown: CancellationToken,
    limiter: Limiter,
) {
    let sd = shutdown.clone();
    accept_loop(listener, shutdown, limiter, true, move |tcp, peer| {
        connection(tcp, peer, front.clone(), sd.clone())
    })
    .await;
}

/// One client connection: requests answered by `front` until one is not for it, then the
/// rest of the connection goes to hyper.
async fn connection<F: FastFront>(
    stream: TcpStream,
    peer: SocketAddr,
    front: Arc<F>,
    shutdown: CancellationToken,
) {
    let conn = Arc::new(FastConn::new(stream));
    // Only while a request is read: an idle or held connection keeps no buffer, so thousands
    // of them do not each keep a kilobyte that its next read would find cold; that read takes
    // the allocator's most recently freed one instead.
    let mut buf = BytesMut::new();
    // Made once per connection, not per request: waiting on the token registers with it (a
    // lock every connection shares), and a timer pushed later is updated in place.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // Each request head must be complete within this time, counted from the accepted
    // connection or the end of the previous answer (slow-loris clients are dropped). The
    // timer is not moved for each request: when it fires before the current deadline it is
    // set to that deadline then (at most once per timeout, not once per request).
    let mut deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
    let head_timer = tokio::time::sleep_until(deadline);
    tokio::pin!(head_timer);
    // `Some(close)` while the front holds this connection's last request.
    let mut held: Option<bool> = None;
    loop {
        if let Some(close) = held {
            if let Some(settled) = conn.take_settled() {
                held = None;
                if !finish_held(&conn, settled).await || close {
                    return;
                }
                deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
            }
        }
        let head = parse_request_head(&buf, |t| front.accepts(t), front.kept_headers());
        if held.is_some() && head != RequestHead::Partial {
            // A request behind the held one, or one for hyper: the held answer goes first.
            tokio::select! {
                biased;
                () = conn.settled(true) => continue,
                _ = cancelled.as_mut() => return shut_held(&conn).await,
            }
        }
        match head {
            RequestHead::Fast(req, len) => {
                buf.advance(len);
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                let close = req.close;
                let mut answer = pin!(front.answer(&conn, peer, req));
                let answered = tokio::select! {
                    biased;
                    r = answer.as_mut() => r,
                    // Shutting down: this answer is finished within the grace, then closed.
                    _ = cancelled.as_mut() => {
                        if let Ok(Ok(Answer::Held)) = tokio::time::timeout(SHUTDOWN_GRACE, answer).await {
                            shut_held(&conn).await;
                        }
                        return;
                    }
                };
                match answered {
                    Ok(Answer::Sent) if !close => {
                        deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
                    }
                    Ok(Answer::Held) => held = Some(close),
                    Ok(Answer::Sent) | Err(_) => return,
                }
            }
            RequestHead::Partial => {
                let read = tokio::select! {
                    biased;
                    r = read_more(&conn.stream, &mut buf) => r,
                    // The holder left this task something to finish (woken only for that).
                    () = conn.settled(false), if held.is_some() => continue,
                    _ = head_timer.as_mut() => {
                        let now = tokio::time::Instant::now();
                        if held.is_some() {
                            // The client waits for the held answer, not we for the client. (Once
                            // that is written, the next head gets up to twice the timeout.)
                            deadline = now + HEADER_READ_TIMEOUT;
                        } else if now >= deadline {
                            return;
                        }
                        head_timer.as_mut().reset(deadline);
                        continue;
                    }
                    _ = cancelled.as_mut() => {
                        if held.is_some() {
                            shut_held(&conn).await;
                        }
                        return;
                    }
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            RequestHead::Other => {
                let Some(stream) = sole_owner(conn).await else {
                    tracing::debug!(%peer, "connection still referenced; closing it");
                    return;
                };
                let io = Prefixed {
                    read: buf.freeze(),
                    inner: stream,
                };
                // Boxed: most connections never get here, and hyper's connection is large.
                Box::pin(front.hand_off(io, peer, &shutdown)).await;
                return;
            }
        }
    }
}

/// Finish a held request as its holder settled it; `false` when the connection is unusable.
async fn finish_held(conn: &FastConn, settled: Settled) -> bool {
    match settled {
        Settled::Written => true,
        Settled::Write(bytes) => write_all(&conn.stream, &bytes).await.is_ok(),
        Settled::Close => false,
    }
}

/// Shutting down with a request held: its answer (the holder's shutdown answers every held
/// request) is waited for and finished within the grace.
async fn shut_held(conn: &FastConn) {
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        conn.settled(true).await;
        if let Some(settled) = conn.take_settled() {
            finish_held(conn, settled).await;
        }
    })
    .await;
}

/// The socket, once `conn` has no other owner. A holder drops its reference right after
/// settling a held request, so a few yields are enough; `None` if that never happens.
async fn sole_owner(mut conn: Arc<FastConn>) -> Option<TcpStream> {
    for _ in 0..64 {
        match Arc::try_unwrap(conn) {
            Ok(c) => return Some(c.stream),
            Err(shared) => conn = shared,
        }
        tokio::task::yield_now().await;
    }
    None
}

/// What a role's [`FastFront::answer`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The whole response is written.
    Sent,
    /// Held ([`FastConn::hold`]): whoever holds it settles it once, with
    /// [`HeldSocket::settle`] or [`HeldSocket::answer_later`]. The connection reads on
    /// meanwhile, and answers no request behind it before that.
    Held,
}

/// A connection on the front: its socket, and where the request the role holds stands.
pub struct FastConn {
    stream: TcpStream,
    held: Held,
}

/// No request held.
const IDLE: u8 = 0;
/// A request held, to be settled by its holder.
const PENDING: u8 = 1;
/// The same, and the connection's task waits for it (a request came in behind it).
const PENDING_WAKE: u8 = 2;
/// Settled: its response written in full.
const WRITTEN: u8 = 3;
/// Settled: the connection's task finishes it ([`Held::action`]).
const ACTION: u8 = 4;

/// The answer to a held request, between its holder and the connection's task.
struct Held {
    /// [`IDLE`], [`PENDING`], [`PENDING_WAKE`], [`WRITTEN`] or [`ACTION`].
    state: AtomicU8,
    /// What the task does when the state is [`ACTION`].
    action: Mutex<Option<Settled>>,
    /// The connection's task, while it waits.
    waker: AtomicWaker,
}

/// How a held request was settled, as the connection's task finishes it.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    /// Nothing left to do.
    Written,
    /// Write these bytes.
    Write(Bytes),
    /// Close the connection.
    Close,
}

/// What [`HeldSocket::send`] wrote, as [`HeldSocket::settle`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The whole response.
    Written,
    /// Part of it (the socket was full): the connection's task writes the rest.
    Partly,
    /// Nothing: the connection is closed.
    Failed,
}

impl FastConn {
    /// A connection on `stream`, holding nothing (the front makes one per connection).
    pub fn new(stream: TcpStream) -> FastConn {
        FastConn {
            stream,
            held: Held {
                state: AtomicU8::new(IDLE),
                action: Mutex::new(None),
                waker: AtomicWaker::new(),
            },
        }
    }

    /// The connection's socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Hold the request being answered ([`Answer::Held`]); whoever gets the returned handle
    /// settles it. Call before that one can see it.
    pub fn hold(self: &Arc<Self>) -> HeldSocket {
        self.held.state.store(PENDING, Ordering::Release);
        HeldSocket {
            fd: self.stream.as_raw_fd(),
            conn: self.clone(),
        }
    }

    fn settle(&self, state: u8, action: Option<Settled>) {
        if action.is_some() {
            *self.held.action.lock().unwrap_or_else(|e| e.into_inner()) = action;
        }
        let was = self.held.state.swap(state, Ordering::AcqRel);
        debug_assert!(
            was == PENDING || was == PENDING_WAKE,
            "a request is settled once, after it is held"
        );
        if state == ACTION || was == PENDING_WAKE {
            self.held.waker.wake();
        }
    }

    /// How the held request was settled, once it was (taken: the connection holds nothing).
    fn take_settled(&self) -> Option<Settled> {
        match self.held.state.load(Ordering::Acquire) {
            WRITTEN => {
                self.held.state.store(IDLE, Ordering::Relaxed);
                Some(Settled::Written)
            }
            ACTION => {
                self.held.state.store(IDLE, Ordering::Relaxed);
                let action = self
                    .held
                    .action
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                Some(action.unwrap_or(Settled::Close))
            }
            _ => None,
        }
    }

    /// Ready once the held request is settled (or nothing is held). The task is woken for a
    /// response written in full only if `wake_on_written`.
    fn settled(&self, wake_on_written: bool) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.held.waker.register(cx.waker());
            if wake_on_written {
                let _ = self.held.state.compare_exchange(
                    PENDING,
                    PENDING_WAKE,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            match self.held.state.load(Ordering::Acquire) {
                PENDING | PENDING_WAKE => Poll::Pending,
                _ => Poll::Ready(()),
            }
        })
    }
}

/// A held request ([`FastConn::hold`]): its connection and its socket's descriptor. A holder
/// that answers thousands of held requests in one loop [`send`](Self::send)s to each through
/// the descriptor alone, touching no connection's memory between the writes (the players at
/// the end of the loop wait for it), and [`settle`](Self::settle)s them after the last one.
pub struct HeldSocket {
    conn: Arc<FastConn>,
    /// `conn`'s socket, open as long as `conn` is.
    fd: RawFd,
}

impl HeldSocket {
    /// The socket's descriptor: a loop writes faster in descriptor order, which is accept order,
    /// the order the kernel made the sockets' state in.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Write as much of `bytes` into the socket as it takes now, without waiting (a player
    /// that hung up is an error, not a `SIGPIPE`). Pass the result to [`settle`](Self::settle).
    pub fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: the descriptor is `conn`'s socket, which this handle keeps open.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        write_now(SockRef::from(&fd), bytes)
    }

    /// Settle the held request after [`send`](Self::send) gave `sent` for `bytes`: the
    /// connection's task writes any rest (waiting for room) or closes a failed connection; it
    /// is not woken for a response written in full.
    pub fn settle(&self, bytes: &Bytes, sent: io::Result<usize>) -> Released {
        match sent {
            Ok(n) if n == bytes.len() => {
                self.conn.settle(WRITTEN, None);
                Released::Written
            }
            Ok(n) => {
                self.conn
                    .settle(ACTION, Some(Settled::Write(bytes.slice(n..))));
                Released::Partly
            }
            Err(_) => {
                self.conn.settle(ACTION, Some(Settled::Close));
                Released::Failed
            }
        }
    }

    /// Settle the held request with `bytes`, written by the connection's task.
    pub fn answer_later(&self, bytes: Bytes) {
        self.conn.settle(ACTION, Some(Settled::Write(bytes)));
    }
}

/// Read what the socket holds into `buf` (0: the client closed it).
async fn read_more(conn: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        conn.readable().await?;
        buf.reserve(1024);
        let mut got = 0;
        let read = conn.try_io(Interest::READABLE, || {
            let spare = buf.spare_capacity_mut();
            let room = spare.len();
            got = SockRef::from(conn).recv(spare)?;
            // A read that did not fill the buffer took all the socket held: the next one would
            // only say "would block", so the readiness is cleared now instead of by that extra
            // syscall (tokio keeps readiness that a newer event set meanwhile).
            if got > 0 && got < room {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(got)
        });
        match read {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            Err(_) if got == 0 => continue,
            _ => {}
        }
        // SAFETY: `recv` initialised the first `got` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + got) };
        return Ok(got);
    }
}

/// Write as much of `bytes` as the socket takes without waiting.
///
/// Straight to the socket, without tokio's readiness check: a publisher writing one response to
/// thousands of sockets in turn would otherwise read each one's readiness state too (memory
/// nothing else in that loop touches). A full socket is not recorded in tokio's readiness, so
/// the rest goes through [`write_all`], whose first `try_write` finds it full and waits.
fn write_now(socket: SockRef<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    while off < bytes.len() {
        // No SIGPIPE for a player that hung up: it is an `EPIPE` error here.
        match socket.send_with_flags(&bytes[off..], libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

/// Write all of `bytes`, waiting for the socket to take them.
pub async fn write_all(conn: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match conn.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `Date` header's value for `t` (IMF-fixdate).
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

thread_local! {
    /// This thread's `Date` value and the second it is for.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Append `date: <now>\r\n` (rendered once per second per thread).
fn put_date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != second {
            *d = (second, http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(d.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// HTTP/1.1 bytes of a handler's response (its body is in memory), with `Date`,
/// `Content-Length` and, when `close`, `Connection: close`.
pub async fn response_bytes(resp: Response, close: bool) -> Bytes {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()));
    response_bytes_with(parts.status, headers, &body, close)
}

/// [`response_bytes`] of a status, headers (name, value) and body at hand: one buffer.
pub fn response_bytes_with<'h>(
    status: StatusCode,
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
    body: &[u8],
    close: bool,
) -> Bytes {
    let mut out = BytesMut::with_capacity(160 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    put_date(&mut out);
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.freeze()
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed {
    read: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::FORWARDED;

    fn under_hls(target: &str) -> bool {
        target.starts_with("/hls/")
    }

    #[test]
    fn only_plain_gets_of_accepted_targets_take_the_front() {
        let fast = |raw: &str| match parse_request_head(raw.as_bytes(), under_hls, &[]) {
            RequestHead::Fast(r, n) => Some((r.uri.to_string(), r.close, n == raw.len())),
            _ => None,
        };
        assert_eq!(
            fast("GET /hls/x/opus/playlist.m3u8?_HLS_msn=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(("/hls/x/opus/playlist.m3u8?_HLS_msn=1".into(), false, true))
        );
        assert_eq!(
            fast("GET /hls/x HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n"),
            Some(("/hls/x".into(), true, true))
        );
        assert_eq!(
            fast("GET /hls/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Some(("/hls/x".into(), false, true))
        );
        for other in [
            "GET /metrics HTTP/1.1\r\n\r\n",
            "HEAD /hls/x HTTP/1.1\r\n\r\n",
            "GET /hls/x HTTP/1.0\r\n\r\n",
            "GET /hls/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /hls/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /hls/x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /hls/x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /hls/x/recording.m4a HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n",
            "POST /recordings/x/publish HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_request_head(other.as_bytes(), under_hls, &[]),
                    RequestHead::Other
                ),
                "{other}"
            );
        }
        assert!(matches!(
            parse_request_head(b"GET /hls/x HTTP/1.1\r\nHo", under_hls, &[]),
            RequestHead::Partial
        ));
        let huge = format!("GET /hls/x HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(
            parse_request_head(huge.as_bytes(), under_hls, &[]),
            RequestHead::Other
        ));
    }

    #[test]
    fn only_the_kept_headers_are_kept_in_order() {
        let raw = "GET /hls/x HTTP/1.1\r\nHost: a\r\nforwarded: for=1.2.3.4\r\nX-Other: 1\r\n\
                   Forwarded: for=5.6.7.8\r\n\r\n";
        let RequestHead::Fast(req, _) = parse_request_head(raw.as_bytes(), under_hls, &[FORWARDED])
        else {
            panic!("a plain GET");
        };
        let kept: Vec<_> = req.headers.get_all(FORWARDED).iter().collect();
        assert_eq!(kept, ["for=1.2.3.4", "for=5.6.7.8"]);
        assert_eq!(req.headers.len(), 2);
    }

    #[test]
    fn responses_carry_their_headers_date_and_length() {
        let headers = [("content-type", &b"application/json"[..])];
        let bytes = response_bytes_with(StatusCode::OK, headers, b"{}", true);
        let text = std::str::from_utf8(&bytes).expect("ASCII");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: "));
        assert!(text.ends_with("\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"));
        let mut parsed = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut parsed);
        assert!(
            matches!(resp.parse(&bytes), Ok(httparse::Status::Complete(n)) if n == bytes.len() - 2)
        );
        let none = response_bytes_with(StatusCode::NOT_FOUND, [], b"", false);
        assert!(none.ends_with(b"content-length: 0\r\n\r\n"));
        assert_eq!(
            http_date(UNIX_EPOCH + std::time::Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }

    /// A front that holds every `/held` request (handing its connection to the test) and
    /// answers `/now` at once.
    struct Holding(tokio::sync::mpsc::UnboundedSender<HeldSocket>);

    const NOW: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnow";

    /// A response of `body` bytes.
    fn held_response(body: usize) -> Bytes {
        let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {body}\r\n\r\n").into_bytes();
        out.resize(out.len() + body, b'h');
        out.into()
    }

    impl FastFront for Holding {
        fn accepts(&self, target: &str) -> bool {
            target == "/held" || target == "/now"
        }

        fn answer(
            self: &Arc<Self>,
            conn: &Arc<FastConn>,
            _peer: SocketAddr,
            req: FastRequest,
        ) -> impl Future<Output = io::Result<Answer>> + Send {
            let (front, conn) = (self.clone(), conn.clone());
            async move {
                if req.uri.path() == "/now" {
                    write_all(conn.stream(), NOW).await?;
                    return Ok(Answer::Sent);
                }
                let _ = front.0.send(conn.hold());
                Ok(Answer::Held)
            }
        }

        async fn hand_off(
            self: &Arc<Self>,
            _io: Prefixed,
            _peer: SocketAddr,
            _shutdown: &CancellationToken,
        ) {
        }
    }

    /// A client connected to one connection served by [`Holding`], the held connections, and
    /// the connection's shutdown token.
    async fn holding_connection() -> (
        TcpStream,
        tokio::sync::mpsc::UnboundedReceiver<HeldSocket>,
        CancellationToken,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        tokio::spawn(connection(
            stream,
            peer,
            Arc::new(Holding(tx)),
            shutdown.clone(),
        ));
        (client, rx, shutdown)
    }

    /// A request for a held answer.
    const HELD: &[u8] = b"GET /held HTTP/1.1\r\n\r\n";

    /// Send `request` (ending with one the front holds) and take the held request.
    async fn ask(
        client: &mut TcpStream,
        held: &mut tokio::sync::mpsc::UnboundedReceiver<HeldSocket>,
        request: &[u8],
    ) -> HeldSocket {
        use tokio::io::AsyncWriteExt;
        client.write_all(request).await.unwrap();
        held.recv().await.unwrap()
    }

    /// Read exactly `len` bytes (within 10 s).
    async fn read_len(client: &mut TcpStream, len: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; len];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut got),
        )
        .await
        .expect("in time")
        .expect("read");
        got
    }

    #[tokio::test]
    async fn held_requests_are_answered_by_their_holder_before_the_next_one() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut held, _shutdown) = holding_connection().await;
        // A request behind a held one (pipelined) waits for it.
        let conn = ask(
            &mut client,
            &mut held,
            b"GET /held HTTP/1.1\r\n\r\nGET /now HTTP/1.1\r\n\r\n",
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut peek = [0u8; 1];
        assert_eq!(
            client.try_read(&mut peek).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing is answered before the held request"
        );
        let first = held_response(5);
        let sent = conn.send(&first);
        assert_eq!(conn.settle(&first, sent), Released::Written);
        let both = read_len(&mut client, first.len() + NOW.len()).await;
        assert_eq!(both, [&first[..], NOW].concat());

        // Answered later: the connection's task writes it.
        let again = ask(&mut client, &mut held, HELD).await;
        assert!(Arc::ptr_eq(&conn.conn, &again.conn));
        let later = held_response(7);
        again.answer_later(later.clone());
        assert_eq!(read_len(&mut client, later.len()).await, later);

        // More than the socket takes now: the connection's task writes the rest.
        let third = ask(&mut client, &mut held, HELD).await;
        SockRef::from(third.conn.stream())
            .set_send_buffer_size(4096)
            .unwrap();
        let big = held_response(1 << 20);
        let sent = third.send(&big);
        assert_eq!(third.settle(&big, sent), Released::Partly);
        assert_eq!(read_len(&mut client, big.len()).await, big);
        client
            .write_all(b"GET /now HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_len(&mut client, NOW.len()).await, NOW);
    }

    #[tokio::test]
    async fn a_request_held_at_shutdown_is_answered_within_the_grace() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut held, shutdown) = holding_connection().await;
        let conn = ask(&mut client, &mut held, HELD).await;
        shutdown.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let last = held_response(3);
        conn.answer_later(last.clone());
        drop(conn);
        assert_eq!(read_len(&mut client, last.len()).await, last);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed after the held answer");
    }
}
