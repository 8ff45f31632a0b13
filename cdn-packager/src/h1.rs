//! The plain HTTP/1.1 listener's fast path for `/hls/...`, on the shared front
//! ([`amphi_protocol::h1`]).
//!
//! Thousands of players hold a blocking playlist reload for the same part. When it is
//! published, the room's uploader writes one pre-rendered response (head and body, rendered
//! once per publication) straight into every waiting socket in one loop ([`release_waiters`]),
//! instead of waking one task per player that would each build, encode and write a response.
//! Other `/hls/` requests of the plain shape the front accepts (`GET`, HTTP/1.1, no body) are
//! answered by the same handler as the hyper path and written here; anything else goes to
//! hyper for the rest of the connection.

use crate::http::{hls, HttpState};
use crate::metrics::{GaugeGuard, Metrics};
use crate::request::{decide_reload, HlsQuery, ReloadDecision};
use crate::snapshot::{PublicationHook, Snapshot, BLOCK_TIMEOUT};
use amphi_protocol::h1::{response_bytes, write_all, write_now, FastFront, FastRequest, Prefixed};
use amphi_protocol::https::{refusal_bytes, Limiter};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

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
    /// The per-address request budget (spent by each request answered here).
    pub limiter: Limiter,
    /// The hyper path, for the rest of a connection that asks for anything else.
    pub app: axum::Router,
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

impl FastFront for FastPath {
    fn accepts(&self, target: &str) -> bool {
        target.starts_with("/hls/")
    }

    fn answer(
        self: &Arc<Self>,
        conn: &Arc<TcpStream>,
        peer: SocketAddr,
        req: FastRequest,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        let (st, conn) = (self.clone(), conn.clone());
        async move {
            if let Err(r) = st.limiter.request(peer.ip()) {
                write_all(&conn, &refusal_bytes(&r)).await?;
                return Err(io::ErrorKind::ConnectionRefused.into());
            }
            answer(&conn, &req, &st).await
        }
    }

    fn hand_off(
        self: &Arc<Self>,
        io: Prefixed,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let (app, shutdown) = (self.app.clone(), shutdown.clone());
        async move { amphi_protocol::https::serve_connection(io, app, peer, &shutdown).await }
    }
}

/// Answer one fast-path request; `Err` when the connection is unusable.
async fn answer(conn: &Arc<TcpStream>, req: &FastRequest, st: &FastPath) -> io::Result<()> {
    let (path, query) = (req.uri.path(), req.uri.query().unwrap_or(""));
    if let Some(held) = blocking_reload(conn, path, query, st) {
        return held.await;
    }
    let resp = hls(&st.http, path, query, None).await;
    let bytes = response_bytes(resp, req.close).await;
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
                    let bytes = response_bytes(crate::http::block_timed_out(), false).await;
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
    fn only_requests_under_hls_take_the_fast_path() {
        let accepts = |t: &str| t.starts_with("/hls/");
        let fast = |raw: &str| {
            matches!(
                amphi_protocol::h1::parse_request_head(raw.as_bytes(), accepts, &[]),
                amphi_protocol::h1::RequestHead::Fast(..)
            )
        };
        assert!(fast(
            "GET /hls/x/opus/playlist.m3u8?_HLS_msn=1 HTTP/1.1\r\nHost: a\r\n\r\n"
        ));
        assert!(!fast("GET /metrics HTTP/1.1\r\n\r\n"));
        assert!(!fast("GET /hlsx HTTP/1.1\r\n\r\n"));
    }
}
