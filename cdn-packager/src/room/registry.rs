//! Every room this packager has seen since it started, and opening one (resumed from storage
//! after a restart).

use super::core::{Inbox, RoomCore};
use super::publish::{ObjectCache, Published};
use super::upload::{uploader, Uploads};
use super::{key, rkey, RoomError, RoomHandle};
#[cfg(feature = "aac")]
use crate::aac::AacRendition;
use crate::fmp4::init_segment;
use crate::metrics::Metrics;
use crate::playlist::{multivariants, renditions, MediaPlaylist, INIT_NAME};
use crate::segmenter::Segmenter;
use crate::snapshot::{PublicationHook, Snapshot};
use crate::speakers::SpeakerTimeline;
use crate::spill::{Recovery, SpillDir};
use crate::storage::{ObjectMeta, Store};
use crate::upload::{Job, MemoryBudget, Publish};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Every room this packager has seen since it started.
pub struct Registry {
    pub(super) store: Arc<Store>,
    metrics: Arc<Metrics>,
    uploads: Arc<Uploads>,
    recovery: Arc<Recovery>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    /// Told of every room's publications.
    hook: Arc<dyn PublicationHook>,
    rooms: Mutex<HashMap<RoomId, Arc<RoomHandle>>>,
    /// Rooms with output in storage from before this run (recordings of ended rooms); `None`
    /// until storage has been listed once.
    stored: Mutex<Option<HashSet<RoomId>>>,
}

impl Registry {
    /// An empty registry storing into `store` (pending uploads: `budget` bytes in memory over
    /// all rooms, the rest in `spill`) and telling `hook` of every publication; uploader tasks
    /// run on `tasks` until `shutdown`. Spill files an earlier run left in `spill` are uploaded
    /// first (each room opens after its own).
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        budget: usize,
        spill: SpillDir,
        hook: Arc<dyn PublicationHook>,
        shutdown: CancellationToken,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        let spill = Arc::new(spill);
        let recovery = crate::spill::recover(
            spill.clone(),
            store.clone(),
            metrics.clone(),
            &tasks,
            shutdown.clone(),
        );
        Registry {
            uploads: Arc::new(Uploads {
                store: store.clone(),
                metrics: metrics.clone(),
                budget: Arc::new(MemoryBudget::new(budget)),
                spill,
            }),
            store,
            metrics,
            recovery,
            hook,
            shutdown,
            tasks,
            rooms: Mutex::new(HashMap::new()),
            stored: Mutex::new(None),
        }
    }

    /// The storage backend.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether storage may hold output of `room`: it is open in this run, or was in storage
    /// when this run listed it, or storage has not been listed yet. HTTP requests for any other
    /// room are answered 404 without a storage read.
    pub fn may_have(&self, room: RoomId) -> bool {
        if self.get(room).is_some() {
            return true;
        }
        match &*self.stored.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(set) => set.contains(&room),
            None => true,
        }
    }

    /// List the rooms in storage once (one listing of its top level), retrying every
    /// `retry` until it works or `shutdown`; until then [`Registry::may_have`] answers yes.
    pub async fn load_stored_rooms(&self, retry: Duration) {
        loop {
            match self.store.top_level().await {
                Ok(names) => {
                    let set: HashSet<RoomId> =
                        names.iter().filter_map(|n| n.parse().ok()).collect();
                    tracing::info!(rooms = set.len(), "rooms in storage listed");
                    *self.stored.lock().unwrap_or_else(|e| e.into_inner()) = Some(set);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot list the rooms in storage (yet)"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// `room`'s stored output was deleted (retention): requests for it no longer read storage.
    pub fn forget_stored(&self, room: RoomId) {
        if let Some(set) = &mut *self.stored.lock().unwrap_or_else(|e| e.into_inner()) {
            set.remove(&room);
        }
    }

    /// `room`'s recording was deleted by its host: its handle (and the media it holds in
    /// memory) goes, and requests for it no longer read storage.
    pub fn forget(&self, room: RoomId) {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
        self.forget_stored(room);
    }

    /// A known room.
    pub fn get(&self, room: RoomId) -> Option<Arc<RoomHandle>> {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room)
            .cloned()
    }

    /// A known room, or a new one: its init segments and multivariant playlist are queued
    /// first, and its uploader started. After a packager restart the room resumes from its
    /// durable recording index: the live playlist and the recording keep the segments (and the
    /// speaker turns) from before, numbering continues after anything already stored, and the
    /// next segment is a discontinuity.
    pub async fn get_or_open(&self, room: RoomId) -> Result<Arc<RoomHandle>, RoomError> {
        if let Some(h) = self.get(room) {
            return Ok(h);
        }
        // What an earlier run spilled for this room is stored before the room resumes from
        // storage (else its numbering would reuse those segments' names).
        if !self.recovery.wait(room, &self.shutdown).await {
            return Err(RoomError::ShuttingDown);
        }
        let rends = renditions();
        let mut resumed = Vec::with_capacity(rends.len());
        for r in rends {
            resumed.push(match self.resume_point(room, *r).await {
                Ok(point) => point,
                Err(e) => {
                    tracing::warn!(%room, error = %e, "cannot read earlier output; numbering from 0");
                    None
                }
            });
        }
        let start_msn = resumed.iter().flatten().map(|p| p.next_msn).max();
        let media_end = resumed
            .iter()
            .flatten()
            .filter_map(|p| p.history.last())
            .map(|s| s.start.program_date_time + crate::playlist::ticks_duration(s.duration))
            .max();
        // Decode times continue after the media written before (the room's first segment
        // had decode time 0).
        let media_start = resumed
            .iter()
            .flatten()
            .filter_map(|p| p.history.first())
            .map(|s| s.start.program_date_time)
            .min();
        let media_base = match (media_start, media_end) {
            (Some(first), Some(end)) => crate::segmenter::resume_base(first, end),
            _ => 0,
        };
        let queue = Arc::new(Inbox::default());
        queue.push(Job::Put {
            key: rkey(room, rends[0], INIT_NAME),
            body: Bytes::from(init_segment()?),
            meta: ObjectMeta::MEDIA,
            publish: Publish::Nothing,
        });
        #[cfg(feature = "aac")]
        let aac = {
            let a = AacRendition::new()?;
            if let Some(r) = rends.get(1) {
                queue.push(Job::Put {
                    key: rkey(room, *r, INIT_NAME),
                    body: Bytes::from(a.init_segment()?),
                    meta: ObjectMeta::MEDIA,
                    publish: Publish::Nothing,
                });
            }
            Some(a)
        };
        for (name, text) in multivariants(rends, "index", "playlist.m3u8") {
            queue.push(Job::Put {
                key: key(room, &name),
                body: Bytes::from(text),
                meta: ObjectMeta::PLAYLIST,
                publish: Publish::Nothing,
            });
        }
        let msn = start_msn.unwrap_or(0);
        let playlists: Vec<MediaPlaylist> = rends
            .iter()
            .zip(resumed)
            .map(|(r, point)| match point {
                Some(p) => MediaPlaylist::resume(*r, p.history, msn),
                None => MediaPlaylist::new(*r, msn),
            })
            .collect();
        let (tx, rx): (Vec<_>, Vec<_>) = rends
            .iter()
            .map(|_| watch::channel(Arc::new(Snapshot::empty(room))))
            .unzip();
        let core = RoomCore::new(
            room,
            rends,
            match start_msn {
                Some(msn) => Segmenter::default().resume_at(msn, media_end, media_base),
                None => Segmenter::default(),
            },
            #[cfg(feature = "aac")]
            aac,
            match start_msn {
                Some(_) => self.stored_turns(room).await,
                None => SpeakerTimeline::new(),
            },
            queue.clone(),
        );
        let handle = Arc::new(RoomHandle {
            room,
            core: Mutex::new(core),
            renditions: rends,
            rx,
            tx,
            published: Mutex::new(Published {
                playlists,
                cache: ObjectCache::default(),
                inits: HashMap::new(),
            }),
            hook: self.hook.clone(),
            inbox: queue,
            recording_ready: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        {
            let p = handle.published();
            handle.send_snapshots(&p);
        }
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = rooms.get(&room) {
            return Ok(existing.clone());
        }
        rooms.insert(room, handle.clone());
        drop(rooms);
        self.metrics.rooms_total.fetch_add(1, Ordering::Relaxed);
        self.metrics.rooms_live.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%room, ?start_msn, storage = self.store.kind(), "room opened");
        self.tasks.spawn(uploader(
            handle.clone(),
            self.uploads.clone(),
            self.shutdown.clone(),
        ));
        Ok(handle)
    }
}
