//! The plain HTTP/1.1 listener's fast path for `/hls/...`.
//!
//! Thousands of players hold a blocking playlist reload for the same part. When it is
//! published, the room's uploader writes one pre-rendered response (head and body, rendered
//! once per publication) straight into every waiting socket in one loop ([`release_waiters`]),
//! instead of waking one task per player that would each build, encode and write a response.
//! Other `/hls/` requests of the plain shape this front accepts (`GET`, HTTP/1.1, no body) are
//! answered by the same handler as the hyper path and written here; anything else (other
//! paths, methods, versions, bodies, upgrades, HTTP/2 prior knowledge) is handed to hyper with
//! the bytes already read, for the rest of the connection.

use crate::http::{hls, HttpState};
use crate::metrics::{GaugeGuard, Metrics};
use crate::request::{decide_reload, HlsQuery, ReloadDecision};
use crate::snapshot::{http_date, PublicationHook, Snapshot, BLOCK_TIMEOUT};
use amphi_protocol::https::{refusal_bytes, Limiter};
use amphi_protocol::RoomId;
use axum::body::Body;
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest request head the fast path reads before handing the connection to hyper.
const MAX_HEAD: usize = 8 * 1024;
/// Headers parsed per request.
const MAX_HEADERS: usize = 32;
/// How long shutdown waits for connections to finish their last answer.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Each request head must be complete within this time, counted from the accepted connection
/// or the end of the previous answer, not from the last byte received (slow-loris clients are
/// dropped): the same bound hyper applies on the other listeners.
const HEAD_TIMEOUT: std::time::Duration = amphi_protocol::https::HEADER_READ_TIMEOUT;

/// A held request's slot is still waiting.
const WAITING: u8 = 0;
/// The publisher took the request and answers it.
const CLAIMED: u8 = 1;
/// The request gave up (timeout, shutdown) and answers itself.
const ABANDONED: u8 = 2;

/// What the publisher did with a held request.
enum Release {
    /// The whole response is written.
    Written,
    /// The socket was full: the connection task writes `bytes[offset..]`.
    Rest(Bytes, usize),
    /// Writing failed: the connection is closed.
    Failed,
}

/// A blocking playlist request held on the fast path.
pub struct Waiter {
    conn: Arc<TcpStream>,
    msn: u64,
    part: Option<u32>,
    skip: bool,
    state: Arc<AtomicU8>,
    done: oneshot::Sender<Release>,
}

/// What the fast path answers from: the hyper path's state (for everything it does not hold)
/// and the requests it holds.
pub struct FastPath {
    /// The HTTP origin's state.
    pub http: Arc<HttpState>,
    /// Blocking reloads held until a publication satisfies them.
    pub held: Arc<HeldReloads>,
}

/// Held requests of one room, per rendition.
type RoomHeld = Vec<Mutex<Vec<Waiter>>>;

/// The blocking playlist reloads the fast path holds, per room and rendition. The rooms'
/// uploaders release them through [`PublicationHook`] after each publication.
pub struct HeldReloads {
    rooms: RwLock<HashMap<RoomId, Arc<RoomHeld>>>,
    metrics: Arc<Metrics>,
}

impl HeldReloads {
    /// Nothing held yet; release delays are recorded in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        HeldReloads {
            rooms: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// `room`'s held requests (`renditions` lists, made on first use).
    fn room(&self, room: RoomId, renditions: usize) -> Arc<RoomHeld> {
        if let Some(held) = self.existing(room) {
            return held;
        }
        self.rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(room)
            .or_insert_with(|| Arc::new((0..renditions).map(|_| Mutex::new(Vec::new())).collect()))
            .clone()
    }

    fn existing(&self, room: RoomId) -> Option<Arc<RoomHeld>> {
        self.rooms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room)
            .cloned()
    }
}

impl PublicationHook for HeldReloads {
    /// Answer every held request of the rendition that `snap` satisfies, each with one write of
    /// the response rendered for this publication.
    fn published(&self, room: RoomId, rendition: usize, snap: &Arc<Snapshot>) {
        if let Some(list) = self.existing(room).as_ref().and_then(|h| h.get(rendition)) {
            release_waiters(list, snap, &self.metrics);
        }
    }

    fn finished(&self, room: RoomId) {
        self.rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
    }
}

/// Answer every request held in `list` that `snap` satisfies.
fn release_waiters(list: &Mutex<Vec<Waiter>>, snap: &Snapshot, metrics: &Metrics) {
    // Taken out of the lock for the writes: requests keep registering meanwhile (for the next
    // part, decided against this snapshot), and a held request that gives up finds itself
    // gone and is skipped here (its state is no longer WAITING).
    let held = {
        let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
        if list.is_empty() {
            return;
        }
        std::mem::take(&mut *list)
    };
    let mut keep = Vec::new();
    for w in held {
        if decide_reload(w.msn, w.part, &snap.status) == ReloadDecision::Wait {
            keep.push(w);
            continue;
        }
        if w.state
            .compare_exchange(WAITING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        let bytes = snap.wire(w.skip);
        let outcome = write_now(&w.conn, &bytes);
        if let Ok(d) = SystemTime::now().duration_since(snap.published_at) {
            metrics.observe_release(d);
        }
        let Waiter { conn, done, .. } = w;
        drop(conn);
        let _ = done.send(match outcome {
            Ok(n) if n == bytes.len() => Release::Written,
            Ok(n) => Release::Rest(bytes, n),
            Err(_) => Release::Failed,
        });
    }
    if !keep.is_empty() {
        list.lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&mut keep);
    }
}

/// Write as much of `bytes` as the socket takes without waiting.
fn write_now(conn: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    while off < bytes.len() {
        match conn.try_write(&bytes[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

async fn write_all(conn: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        conn.writable().await?;
        match conn.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Accept connections on `listener` until `shutdown`; each that `limiter` admits is served by
/// [`connection`] (a refused one is answered 503 without being read). Returns once every
/// connection has finished.
pub async fn serve(
    listener: TcpListener,
    state: Arc<FastPath>,
    app: axum::Router,
    shutdown: CancellationToken,
    limiter: Limiter,
) -> io::Result<()> {
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permit = match limiter.connection(peer.ip()) {
                    Ok(p) => p,
                    Err(r) => {
                        tracing::debug!(%peer, "connection refused: too many from this address");
                        let _ = stream.try_write(&refusal_bytes(&r));
                        continue;
                    }
                };
                let conn = connection(
                    stream,
                    peer,
                    state.clone(),
                    app.clone(),
                    shutdown.clone(),
                    limiter.clone(),
                );
                conns.spawn(async move {
                    conn.await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    conns.close();
    // Connections stop on the cancellation; one whose client stopped reading may not: bounded.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await;
    Ok(())
}

/// A request the fast path answers.
#[derive(Debug, PartialEq, Eq)]
pub struct FastRequest {
    /// Path and query as sent.
    pub target: String,
    /// `Connection: close` was asked for.
    pub close: bool,
}

/// What the bytes read so far of a connection hold, as the plain listener's front sees them.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestHead {
    /// A complete request head of `.1` bytes the fast path answers.
    Fast(FastRequest, usize),
    /// Not complete yet.
    Partial,
    /// Something for hyper (the whole rest of the connection).
    Other,
}

/// Classify the start of a connection's unread bytes. Network-facing: never panics (fuzzed
/// under `fuzz/`).
pub fn parse_request_head(buf: &[u8]) -> RequestHead {
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
    if !target.starts_with("/hls/") {
        return RequestHead::Other;
    }
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return RequestHead::Other;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
            // Byte ranges (the recording's file) are answered by hyper.
            || name.eq_ignore_ascii_case("range")
        {
            return RequestHead::Other;
        } else if name.eq_ignore_ascii_case("connection") {
            close = h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    RequestHead::Fast(
        FastRequest {
            target: target.to_string(),
            close,
        },
        len,
    )
}

/// One client connection: requests answered here until one is not for the fast path, then
/// the rest of the connection goes to hyper.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<FastPath>,
    app: axum::Router,
    shutdown: CancellationToken,
    limiter: Limiter,
) {
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(stream);
    let mut buf = BytesMut::with_capacity(1024);
    let mut head_deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        match parse_request_head(&buf) {
            RequestHead::Fast(req, len) => {
                buf.advance(len);
                if let Err(r) = limiter.request(peer.ip()) {
                    let _ = write_all(&conn, &refusal_bytes(&r)).await;
                    return;
                }
                let keep = answer(&conn, &req, &state).await.is_ok() && !req.close;
                if !keep {
                    return;
                }
                head_deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
            }
            RequestHead::Partial => {
                let read = tokio::select! {
                    r = read_more(&conn, &mut buf) => r,
                    _ = tokio::time::sleep_until(head_deadline) => return,
                    _ = shutdown.cancelled() => return,
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            RequestHead::Other => {
                hand_to_hyper(conn, buf.freeze(), peer, app, shutdown).await;
                return;
            }
        }
    }
}

async fn read_more(conn: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        conn.readable().await?;
        buf.reserve(1024);
        match conn.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Answer one fast-path request; `Err` when the connection is unusable.
async fn answer(conn: &Arc<TcpStream>, req: &FastRequest, st: &FastPath) -> io::Result<()> {
    let (path, query) = req
        .target
        .split_once('?')
        .unwrap_or((req.target.as_str(), ""));
    if let Some(held) = blocking_reload(conn, path, query, st) {
        return held.await;
    }
    let resp = hls(&st.http, path, query, None).await;
    let bytes = serialize(resp, req.close).await;
    write_all(conn, &bytes).await
}

/// A blocking playlist reload of a live room: answered with the pre-rendered response now,
/// or held as a [`Waiter`] until a publication satisfies it. `None`: anything else.
fn blocking_reload<'a>(
    conn: &'a Arc<TcpStream>,
    path: &str,
    query: &str,
    st: &'a FastPath,
) -> Option<impl std::future::Future<Output = io::Result<()>> + 'a> {
    let p = crate::request::parse_hls_path(path).ok()?;
    let crate::request::HlsResource::MediaPlaylist(r) = p.resource else {
        return None;
    };
    let q: HlsQuery = crate::request::parse_hls_query(query).ok()?;
    let msn = q.msn?;
    let handle = st.http.registry.get(p.room)?;
    let ri = handle.rendition_index(r.dir())?;
    let snap = handle.rx[ri].borrow().clone();
    let decision = decide_reload(msn, q.part, &snap.status);
    let registration = match decision {
        ReloadDecision::TooFar => return None,
        ReloadDecision::Ready if !snap.status.has_media() => return None,
        ReloadDecision::Ready => None,
        ReloadDecision::Wait => {
            let state = Arc::new(AtomicU8::new(WAITING));
            let (tx, rx) = oneshot::channel();
            // Only a request that waits looks up (or makes) the room's held list.
            let held = st.held.room(p.room, handle.renditions.len());
            let list = held.get(ri)?;
            let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
            // Decide again under the lock: a publication may have slipped in.
            let now = handle.rx[ri].borrow().clone();
            if decide_reload(msn, q.part, &now.status) == ReloadDecision::Wait {
                list.push(Waiter {
                    conn: conn.clone(),
                    msn,
                    part: q.part,
                    skip: q.skip,
                    state: state.clone(),
                    done: tx,
                });
                Some((state, rx, held.clone()))
            } else {
                None
            }
        }
    };
    Some(async move {
        let Some((state, mut rx, held)) = registration else {
            let snap = handle.rx[ri].borrow().clone();
            return write_all(conn, &snap.wire(q.skip)).await;
        };
        let _g = GaugeGuard::new(&st.http.metrics.blocking_in_flight);
        let released = tokio::select! {
            r = &mut rx => r.ok(),
            _ = tokio::time::sleep(BLOCK_TIMEOUT) => None,
            _ = st.http.shutdown.cancelled() => None,
        };
        let released = match released {
            Some(r) => r,
            None => {
                if state
                    .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    if let Some(list) = held.get(ri) {
                        list.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|w| !Arc::ptr_eq(&w.state, &state));
                    }
                    st.http
                        .metrics
                        .blocking_timeouts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let bytes = serialize(crate::http::block_timed_out(), false).await;
                    return write_all(conn, &bytes).await;
                }
                // Claimed by the publisher at the last moment: its answer is on the way.
                rx.await.unwrap_or(Release::Failed)
            }
        };
        match released {
            Release::Written => Ok(()),
            Release::Rest(bytes, off) => write_all(conn, &bytes[off..]).await,
            Release::Failed => Err(io::ErrorKind::BrokenPipe.into()),
        }
    })
}

/// HTTP/1.1 bytes of a handler's response (its body is always in memory).
async fn serialize(resp: Response, close: bool) -> Bytes {
    let (parts, body) = resp.into_parts();
    let body = body_bytes(body).await;
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if let Ok(v) = value.to_str() {
            let _ = write!(head, "{name}: {v}\r\n");
        }
    }
    let _ = write!(
        head,
        "date: {}\r\ncontent-length: {}\r\n{}\r\n",
        http_date(SystemTime::now()),
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    let mut out = BytesMut::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

async fn body_bytes(body: Body) -> Bytes {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

/// The rest of the connection goes to hyper (HTTP/1.1 or HTTP/2 prior knowledge), starting
/// with the bytes already read.
async fn hand_to_hyper(
    conn: Arc<TcpStream>,
    read: Bytes,
    peer: SocketAddr,
    app: axum::Router,
    shutdown: CancellationToken,
) {
    let Ok(stream) = Arc::try_unwrap(conn) else {
        tracing::debug!(%peer, "connection still referenced; closing it");
        return;
    };
    let io = Prefixed {
        read,
        inner: stream,
    };
    amphi_protocol::https::serve_connection(io, app, peer, &shutdown).await;
}

/// A stream that first yields bytes already read from it.
struct Prefixed {
    read: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_reloads_are_kept_per_room_until_the_room_finishes() {
        let held = HeldReloads::new(Arc::new(Metrics::default()));
        let (a, b) = (RoomId::random(), RoomId::random());
        let lists = held.room(a, 2);
        assert_eq!(lists.len(), 2);
        assert!(Arc::ptr_eq(&lists, &held.room(a, 2)), "one entry per room");
        assert!(held.existing(b).is_none());
        // A publication of a room nobody waits on, or of a rendition it lacks, is a no-op.
        let snap = Arc::new(Snapshot::empty(b));
        held.published(b, 0, &snap);
        held.published(a, 7, &snap);
        held.finished(a);
        assert!(held.existing(a).is_none());
    }

    #[test]
    fn only_plain_gets_under_hls_take_the_fast_path() {
        let fast = |raw: &str| match parse_request_head(raw.as_bytes()) {
            RequestHead::Fast(r, n) => Some((r.target, r.close, n == raw.len())),
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
        for other in [
            "GET /metrics HTTP/1.1\r\n\r\n",
            "HEAD /hls/x HTTP/1.1\r\n\r\n",
            "GET /hls/x HTTP/1.0\r\n\r\n",
            "GET /hls/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /hls/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /hls/x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /hls/x/recording.m4a HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n",
            "POST /recordings/x/publish HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request_head(other.as_bytes()), RequestHead::Other),
                "{other}"
            );
        }
        assert!(matches!(
            parse_request_head(b"GET /hls/x HTTP/1.1\r\nHo"),
            RequestHead::Partial
        ));
        let huge = format!("GET /hls/x HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(
            parse_request_head(huge.as_bytes()),
            RequestHead::Other
        ));
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }
}
