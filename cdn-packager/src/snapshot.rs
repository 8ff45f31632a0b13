//! What a publication of a room's playlists produces, shared by the room (which publishes) and
//! both HTTP paths (which answer with it): the [`Snapshot`] of one rendition, its pre-rendered
//! HTTP/1.1 blocking-reload answer, the headers those answers carry, and the
//! [`PublicationHook`] through which the HTTP/1.1 fast path learns of each publication.

use crate::playlist::{PlaylistStatus, TARGET_DURATION};
use amphi_protocol::h1::http_date;
use amphi_protocol::RoomId;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a blocking request is held: three target durations (rfc8216bis 6.2.5.2).
pub const BLOCK_TIMEOUT: Duration = Duration::from_secs(3 * TARGET_DURATION as u64);

/// Content type of playlists.
pub(crate) const PLAYLIST_TYPE: &str = crate::storage::content_type::PLAYLIST;
/// A blocking reload's answer is what that `_HLS_msn`/`_HLS_part` URL will always be: cacheable
/// for the playlist's lifetime window (rfc8216bis 6.2.5.2 and Apple's CDN guidance).
pub(crate) const BLOCKING_PLAYLIST_CACHE: &str = "max-age=6";
/// Response header with the publication time (Unix microseconds) of the playlist state served.
pub const PUBLISHED_HEADER: &str = "x-amphi-published-us";

/// A published playlist state of one rendition.
#[derive(Debug)]
pub struct Snapshot {
    /// The room.
    pub room: RoomId,
    /// What blocking reloads decide on.
    pub status: PlaylistStatus,
    /// The part named by `EXT-X-PRELOAD-HINT`.
    pub hint: Option<(u64, u32)>,
    /// The full playlist.
    pub full: Bytes,
    /// The delta update (`_HLS_skip=YES`), when it skips anything.
    pub delta: Option<Bytes>,
    /// When this state was published (for delivery-delay measurements).
    pub published_at: SystemTime,
    /// The HTTP/1.1 answer to a blocking reload (head and `full`), rendered once.
    pub wire_full: Bytes,
    /// The same with `delta` as the body, when there is a delta update.
    pub wire_delta: Option<Bytes>,
}

impl Snapshot {
    /// The pre-rendered blocking-reload answer: the delta update if asked for and available.
    pub fn wire(&self, skip: bool) -> &Bytes {
        match (&self.wire_delta, skip) {
            (Some(d), true) => d,
            _ => &self.wire_full,
        }
    }

    /// The state before anything is published.
    pub fn empty(room: RoomId) -> Self {
        Snapshot {
            room,
            status: PlaylistStatus::default(),
            hint: None,
            full: Bytes::new(),
            delta: None,
            published_at: SystemTime::UNIX_EPOCH,
            wire_full: Bytes::new(),
            wire_delta: None,
        }
    }
}

/// Told of every publication of a room's playlists (the HTTP/1.1 fast path answers the blocking
/// reloads it holds). Called by the room's uploader right after the new snapshots are sent.
pub trait PublicationHook: Send + Sync {
    /// `room`'s rendition `rendition` published `snapshot`.
    fn published(&self, room: RoomId, rendition: usize, snapshot: &Arc<Snapshot>);
    /// `room`'s recording is stored: nothing of it will be published again.
    fn finished(&self, room: RoomId);
}

/// The pre-rendered HTTP/1.1 answer to a blocking playlist reload: `body`, published at `at`,
/// with the headers of the hyper path's answer (content type, `max-age=6`, CORS, publication
/// time) and `Date`.
pub fn render_blocking_answer(body: &[u8], at: SystemTime) -> Bytes {
    let us = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {PLAYLIST_TYPE}\r\ncache-control: {BLOCKING_PLAYLIST_CACHE}\r\n\
         access-control-allow-origin: *\r\n{PUBLISHED_HEADER}: {us}\r\ndate: {}\r\n\
         content-length: {}\r\n\r\n",
        http_date(at),
        body.len()
    );
    let mut out = BytesMut::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out.freeze()
}
