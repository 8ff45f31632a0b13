//! Per-room driver. The ingest side ([`RoomCore`], `core.rs`) feeds the sans-IO segmenter, the
//! AAC rendition and the speaker timeline and queues what they produce; the room's uploader task
//! (`upload.rs`) stores each object in order and only then publishes it (`publish.rs`):
//! playlists are updated, snapshots go to blocked HTTP requests through `watch` channels and the
//! [`PublicationHook`], recent objects stay in a small memory cache for the HTTP origin. When the
//! room ends its recording is written (`recording.rs`); the [`Registry`] (`registry.rs`) opens
//! rooms, resuming them from storage after a restart.

mod core;
mod publish;
mod recording;
mod registry;
mod upload;

pub use self::core::RoomCore;
pub use registry::Registry;

use self::core::Inbox;
use crate::fmp4::MuxError;
use crate::playlist::{PlaylistError, Rendition};
use crate::snapshot::{PublicationHook, Snapshot};
use crate::storage::StorageError;
use amphi_protocol::RoomId;
use bytes::Bytes;
use publish::Published;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Why a room update failed.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// Muxing failed.
    #[error("mux: {0}")]
    Mux(#[from] MuxError),
    /// Transcoding to AAC failed.
    #[cfg(feature = "aac")]
    #[error("aac: {0}")]
    Aac(#[from] crate::aac::AacError),
    /// The playlist refused an update (a bug: parts out of order).
    #[error("playlist: {0}")]
    Playlist(#[from] PlaylistError),
    /// The packager is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// Storage key of a room's file.
pub fn key(room: RoomId, rest: &str) -> String {
    format!("{room}/{rest}")
}

/// Storage key of a rendition's file.
pub fn rkey(room: RoomId, r: Rendition, file: &str) -> String {
    format!("{room}/{}/{file}", r.dir)
}

/// A room as the HTTP side sees it.
pub struct RoomHandle {
    /// Room id.
    pub room: RoomId,
    /// The ingest side.
    pub core: Mutex<RoomCore>,
    /// Renditions, in multivariant order.
    pub renditions: &'static [Rendition],
    /// Playlist snapshots per rendition; `wait_for` on a clone to block.
    pub rx: Vec<watch::Receiver<Arc<Snapshot>>>,
    tx: Vec<watch::Sender<Arc<Snapshot>>>,
    published: Mutex<Published>,
    /// Told of each publication (the HTTP/1.1 fast path's held requests).
    hook: Arc<dyn PublicationHook>,
    inbox: Arc<Inbox>,
    /// The recording (VOD playlists) is stored.
    pub recording_ready: AtomicBool,
    /// The room ended and its recording's last object is stored (with or without media).
    pub finished: AtomicBool,
}

impl RoomHandle {
    /// Lock the ingest side.
    pub fn core(&self) -> std::sync::MutexGuard<'_, RoomCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the rendition in directory `dir`.
    pub fn rendition_index(&self, dir: &str) -> Option<usize> {
        self.renditions.iter().position(|r| r.dir == dir)
    }

    /// A stored object of this room still in memory.
    pub fn cached(&self, key: &str) -> Option<Bytes> {
        let p = self.published();
        p.cache
            .objects
            .get(key)
            .or_else(|| p.inits.get(key))
            .cloned()
    }
}
