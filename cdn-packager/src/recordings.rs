//! Recordings the host controls: who may read a room's recording (public once published,
//! otherwise only with a signed URL the geo-router hands to the host), publishing it (the
//! downloadable `recording.m4a` is built, then `published.json` written) and deleting it (every
//! object of the room removed from storage). The geo-router decides and asks with a
//! [`RecordingGrant`] signed by its token key (`Authorization: Bearer`); the packager checks it
//! with the token verification keys.
//!
//! The access decision ([`decide`]) is pure; [`Recordings`] holds what this process knows and
//! carries out publish and delete against storage.

use crate::chapters::{Chapter, CHAPTERS_JSON};
use crate::m4a::{self, RECORDING_M4A};
use crate::room::{key, Registry};
use crate::storage::{ObjectMeta, Storage, StorageError};
use amphi_protocol::token::{RecordingAction, RecordingGrant, TokenError, TokenVerifier};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

/// Storage key (in the room's directory) whose presence marks a published recording.
pub const PUBLISHED_MARKER: &str = "published.json";
/// Rooms whose deletion (answered 410; beyond it 404) or publication (beyond it one storage
/// read per request) this process remembers.
const MAX_REMEMBERED: usize = 65_536;

/// How a request for a recording resource is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Serve it.
    Allowed,
    /// 403 `recording_private`: not published and no valid read grant for this room.
    Private,
    /// 410 `recording_deleted`.
    Deleted,
}

/// Decide a read of `room`'s recording: deleted wins; then published or not private at all
/// (privacy off); then a read grant of this very room.
pub fn decide(
    room: RoomId,
    private: bool,
    deleted: bool,
    published: bool,
    grant: Option<&Result<RecordingGrant, TokenError>>,
) -> Access {
    if deleted {
        return Access::Deleted;
    }
    if !private || published {
        return Access::Allowed;
    }
    match grant {
        Some(Ok(g)) if g.room == room && g.act == RecordingAction::Read => Access::Allowed,
        _ => Access::Private,
    }
}

/// Whether a grant authorises `act` on `room` (the router's publish and delete requests).
pub fn authorises(
    grant: &Result<RecordingGrant, TokenError>,
    room: RoomId,
    act: RecordingAction,
) -> bool {
    matches!(grant, Ok(g) if g.room == room && g.act == act)
}

/// Why publishing or deleting failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The room is live here (its recording is not written yet).
    #[error("the room is live")]
    Live,
    /// No recording of the room is stored (never had one, not finished, or deleted).
    #[error("no recording stored")]
    NotFound,
    /// The recording has no AAC-LC media to make the file from.
    #[error("no AAC media to publish: {0}")]
    NoMedia(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// What a publication wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Bytes of `recording.m4a`.
    pub m4a_bytes: usize,
    /// Chapters in it.
    pub chapters: usize,
}

/// This process's view of recordings: which are published (cached once seen), which it deleted.
pub struct Recordings {
    /// Verification keys of the router's grants.
    pub tokens: TokenVerifier,
    /// Recordings need a grant until published (`[packager.recording] private_until_published`).
    pub private: bool,
    published: Mutex<HashSet<RoomId>>,
    deleted: RwLock<HashSet<RoomId>>,
    /// `deleted` is not empty: every HLS request asks [`Recordings::deleted`], and until a
    /// recording is deleted that costs one relaxed load.
    any_deleted: AtomicBool,
}

impl Recordings {
    /// Grants checked with `tokens`; reads gated when `private`.
    pub fn new(tokens: TokenVerifier, private: bool) -> Self {
        Recordings {
            tokens,
            private,
            published: Mutex::new(HashSet::new()),
            deleted: RwLock::new(HashSet::new()),
            any_deleted: AtomicBool::new(false),
        }
    }

    /// Whether this process deleted `room`'s recording (every resource of it answers 410).
    pub fn deleted(&self, room: RoomId) -> bool {
        self.any_deleted.load(Ordering::Relaxed)
            && self
                .deleted
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&room)
    }

    /// How a read of `room`'s recording with the URL's `sig` is answered at `now` (Unix
    /// seconds). A published recording is remembered; a private one costs one storage read of
    /// its marker (another packager may have published it).
    pub async fn access(
        &self,
        registry: &Registry,
        room: RoomId,
        sig: Option<&str>,
        now: u64,
    ) -> Result<Access, StorageError> {
        let deleted = self.deleted(room);
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&room);
        let grant = sig.map(|s| self.tokens.verify_grant(s, now));
        if self.private
            && !deleted
            && !published
            && decide(room, true, false, false, grant.as_ref()) != Access::Allowed
        {
            published = registry
                .store()
                .get(&key(room, PUBLISHED_MARKER))
                .await?
                .is_some();
            if published {
                remember(&self.published, room);
            }
        }
        Ok(decide(
            room,
            self.private,
            deleted,
            published,
            grant.as_ref(),
        ))
    }

    /// Publish `room`'s recording: build `recording.m4a` from the AAC-LC rendition's init and
    /// VOD segments with the stored chapters, store it, then the published marker. Publishing
    /// again rewrites both.
    pub async fn publish(
        &self,
        registry: &Registry,
        room: RoomId,
    ) -> Result<Published, ControlError> {
        if self.deleted(room) {
            return Err(ControlError::NotFound);
        }
        live_check(registry, room)?;
        let store = registry.store();
        if store.get(&key(room, "recording.json")).await?.is_none() {
            return Err(ControlError::NotFound);
        }
        let vod = store
            .get(&key(room, "aac/vod.m3u8"))
            .await?
            .ok_or_else(|| ControlError::NoMedia("no aac/vod.m3u8".into()))?;
        let (init_name, segment_names) = vod_files(&String::from_utf8_lossy(&vod));
        let init_name = init_name.ok_or_else(|| ControlError::NoMedia("no EXT-X-MAP".into()))?;
        let init = store
            .get(&key(room, &format!("aac/{init_name}")))
            .await?
            .ok_or_else(|| ControlError::NoMedia(format!("aac/{init_name} missing")))?;
        let mut segments = Vec::with_capacity(segment_names.len());
        for name in &segment_names {
            match store.get(&key(room, &format!("aac/{name}"))).await? {
                Some(b) => segments.push(b),
                None => {
                    tracing::warn!(%room, segment = %name, "segment missing from the published file")
                }
            }
        }
        let chapters: Vec<Chapter> = match store.get(&key(room, CHAPTERS_JSON)).await? {
            Some(json) => m4a::chapters_from_json(&json),
            None => Vec::new(),
        };
        let refs: Vec<&[u8]> = segments.iter().map(|b| b.as_ref()).collect();
        let file = m4a::build(&init, &refs, &chapters)
            .map_err(|e| ControlError::NoMedia(e.to_string()))?;
        let published = Published {
            m4a_bytes: file.len(),
            chapters: m4a::chapter_list(&chapters).entries.len(),
        };
        store
            .put(
                &key(room, RECORDING_M4A),
                Bytes::from(file),
                ObjectMeta::DOWNLOAD,
            )
            .await?;
        let marker = serde_json::json!({ "room": room.to_string(), "file": RECORDING_M4A });
        store
            .put(
                &key(room, PUBLISHED_MARKER),
                Bytes::from(marker.to_string()),
                ObjectMeta::JSON,
            )
            .await?;
        remember(&self.published, room);
        tracing::info!(%room, bytes = published.m4a_bytes, chapters = published.chapters, "recording published");
        Ok(published)
    }

    /// Delete every object of `room` from storage; answers how many were removed. Requests for
    /// it are then answered 410 by this process.
    pub async fn delete(&self, registry: &Registry, room: RoomId) -> Result<usize, ControlError> {
        live_check(registry, room)?;
        let store = registry.store();
        let keys = store.list(&format!("{room}/")).await?;
        for k in &keys {
            store.delete(k).await?;
        }
        {
            let mut deleted = self.deleted.write().unwrap_or_else(|e| e.into_inner());
            if deleted.len() < MAX_REMEMBERED {
                deleted.insert(room);
                self.any_deleted.store(true, Ordering::Relaxed);
            }
        }
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
        registry.forget(room);
        tracing::info!(%room, removed = keys.len(), "recording deleted");
        Ok(keys.len())
    }
}

/// Add `room` to `set` unless it holds [`MAX_REMEMBERED`] rooms already.
fn remember(set: &Mutex<HashSet<RoomId>>, room: RoomId) {
    let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
    if set.len() < MAX_REMEMBERED {
        set.insert(room);
    }
}

/// A room still live in this process (its recording not stored yet) cannot be published or
/// deleted.
fn live_check(registry: &Registry, room: RoomId) -> Result<(), ControlError> {
    match registry.get(room) {
        Some(h) if !h.finished.load(Ordering::Relaxed) => Err(ControlError::Live),
        _ => Ok(()),
    }
}

/// The init segment (`EXT-X-MAP` URI) and the segment URIs of a VOD playlist the packager
/// wrote, in order; gaps (`EXT-X-GAP`) are left out and only plain file names are kept.
pub fn vod_files(playlist: &str) -> (Option<String>, Vec<String>) {
    let plain = |n: &str| {
        !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !n.starts_with('.')
    };
    let mut init = None;
    let mut segments = Vec::new();
    let mut gap = false;
    for line in playlist.lines().map(str::trim) {
        if let Some(attrs) = line.strip_prefix("#EXT-X-MAP:") {
            if let Some(uri) = attrs
                .split("URI=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                if plain(uri) {
                    init = Some(uri.to_string());
                }
            }
        } else if line == "#EXT-X-GAP" {
            gap = true;
        } else if !line.is_empty() && !line.starts_with('#') {
            if !gap && plain(line) {
                segments.push(line.to_string());
            }
            gap = false;
        }
    }
    (init, segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(room: u64, act: RecordingAction) -> Result<RecordingGrant, TokenError> {
        Ok(RecordingGrant {
            room: RoomId(room),
            act,
            iat: 0,
            exp: 60,
        })
    }

    #[test]
    fn a_private_recording_needs_a_read_grant_of_that_room() {
        let r = RoomId(7);
        assert_eq!(decide(r, true, false, false, None), Access::Private);
        let read = grant(7, RecordingAction::Read);
        assert_eq!(decide(r, true, false, false, Some(&read)), Access::Allowed);
        for wrong in [
            grant(8, RecordingAction::Read),
            grant(7, RecordingAction::Publish),
            Err(TokenError::Expired),
        ] {
            assert_eq!(
                decide(r, true, false, false, Some(&wrong)),
                Access::Private,
                "{wrong:?}"
            );
        }
        assert_eq!(
            decide(r, true, false, true, None),
            Access::Allowed,
            "published"
        );
        assert_eq!(
            decide(r, false, false, false, None),
            Access::Allowed,
            "privacy off"
        );
        assert_eq!(decide(r, false, true, true, Some(&read)), Access::Deleted);
    }

    #[test]
    fn only_the_action_granted_for_the_room_is_authorised() {
        let r = RoomId(7);
        assert!(authorises(
            &grant(7, RecordingAction::Delete),
            r,
            RecordingAction::Delete
        ));
        assert!(!authorises(
            &grant(7, RecordingAction::Read),
            r,
            RecordingAction::Delete
        ));
        assert!(!authorises(
            &grant(8, RecordingAction::Delete),
            r,
            RecordingAction::Delete
        ));
        assert!(!authorises(
            &Err(TokenError::Signature),
            r,
            RecordingAction::Publish
        ));
    }

    #[test]
    fn the_files_of_a_vod_playlist_in_order_without_gaps() {
        let vod = "#EXTM3U\n#EXT-X-MAP:URI=\"init.m4a\"\n#EXTINF:2.0,\nseg0.m4a\n\
                   #EXT-X-GAP\n#EXTINF:2.0,\nseg1.m4a\n#EXT-X-DISCONTINUITY\n#EXTINF:2.0,\nseg2.m4a\n\
                   #EXTINF:2.0,\n../x/seg3.m4a\n#EXT-X-ENDLIST\n";
        let (init, segs) = vod_files(vod);
        assert_eq!(init.as_deref(), Some("init.m4a"));
        assert_eq!(segs, ["seg0.m4a", "seg2.m4a"]);
    }
}
