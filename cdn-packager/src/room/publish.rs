//! Publication: a stored (or, during a storage outage, queued) object updates the room's
//! playlists and memory cache, and new snapshots go to blocked requests.

use super::{rkey, RoomHandle};
use crate::metrics::Metrics;
use crate::playlist::{MediaPlaylist, RenditionReport, INIT_NAME};
use crate::snapshot::{render_blocking_answer, Snapshot};
use crate::storage::ObjectMeta;
use crate::upload::{Job, Publish};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Segments whose parts and segment stay in the memory cache.
const CACHE_SEGMENTS: u64 = 4;

/// Recently stored objects, served without a storage round trip.
#[derive(Debug, Default)]
pub(super) struct ObjectCache {
    pub(super) objects: HashMap<String, Bytes>,
    order: VecDeque<(u64, String)>,
}

impl ObjectCache {
    fn insert(&mut self, msn: u64, key: String, body: Bytes) {
        self.order.push_back((msn, key.clone()));
        self.objects.insert(key, body);
        while let Some((m, _)) = self.order.front() {
            if m + CACHE_SEGMENTS >= msn {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.objects.remove(&k);
            }
        }
    }
}

/// What the HTTP side reads.
pub(super) struct Published {
    pub(super) playlists: Vec<MediaPlaylist>,
    pub(super) cache: ObjectCache,
    /// Init segments (kept for the room's life).
    pub(super) inits: HashMap<String, Bytes>,
}

impl RoomHandle {
    /// Publish a queued job (stored, or storage is failing): playlists, snapshots and the
    /// memory cache are updated. Returns the jobs this queues in turn: after a segment, its
    /// recording index chunks and a copy of the live playlist; after the room's end, its
    /// recording.
    pub(super) fn publish_job(&self, job: Job, body: Bytes, metrics: &Metrics) -> Vec<Job> {
        match job {
            Job::Put { key, publish, .. } => {
                let segment = match &publish {
                    Publish::Segment { rendition, msn, .. } => Some((*rendition, *msn)),
                    _ => None,
                };
                self.publish(key, body, publish, metrics);
                let Some((ri, msn)) = segment else {
                    return Vec::new();
                };
                // The durable recording index, then a copy of the live playlist (inspection,
                // and serving it once the room is gone).
                let r = self.renditions[ri];
                let mut jobs: Vec<Job> = self
                    .index_chunks(ri, msn)
                    .into_iter()
                    .map(|(key, body)| Job::Put {
                        key,
                        body,
                        meta: ObjectMeta::INDEX,
                        publish: Publish::Nothing,
                    })
                    .collect();
                jobs.push(Job::Put {
                    key: rkey(self.room, r, "playlist.m3u8"),
                    body: self.rx[ri].borrow().full.clone(),
                    meta: ObjectMeta::PLAYLIST,
                    publish: Publish::Nothing,
                });
                jobs
            }
            Job::End { spans } => self.finish_recording(&spans),
        }
    }

    /// Apply a job's publication and send new snapshots.
    fn publish(&self, key: String, body: Bytes, what: Publish, metrics: &Metrics) {
        let mut p = self.published();
        let result = match what {
            Publish::Nothing | Publish::RecordingStored { .. } => {
                if key.ends_with(INIT_NAME) {
                    p.inits.insert(key, body);
                }
                return;
            }
            Publish::Part {
                rendition,
                msn,
                index,
                duration,
                start,
                arrival,
            } => {
                if !body.is_empty() {
                    p.cache.insert(msn, key, body);
                }
                let r = p
                    .playlists
                    .get_mut(rendition)
                    .map(|pl| pl.add_part(msn, index, duration, start));
                if rendition == 0 {
                    metrics.parts_published.fetch_add(1, Ordering::Relaxed);
                    metrics
                        .observe_publish_delay(Instant::now().saturating_duration_since(arrival));
                }
                r
            }
            Publish::Segment {
                rendition,
                msn,
                start,
                duration,
            } => {
                if !body.is_empty() {
                    p.cache.insert(msn, key, body);
                }
                if rendition == 0 {
                    metrics.segments_published.fetch_add(1, Ordering::Relaxed);
                }
                p.playlists
                    .get_mut(rendition)
                    .map(|pl| pl.complete_segment(msn, start, duration))
            }
        };
        if let Some(Err(e)) = result {
            tracing::error!(room = %self.room, error = %e, "playlist update refused");
        }
        self.send_snapshots(&p);
        drop(p);
        self.announce();
    }

    /// Tell the publication hook of the current snapshots (the fast path answers the held
    /// requests they satisfy).
    pub(super) fn announce(&self) {
        for (ri, rx) in self.rx.iter().enumerate() {
            let snap = rx.borrow().clone();
            self.hook.published(self.room, ri, &snap);
        }
    }

    pub(super) fn send_snapshots(&self, p: &Published) {
        let now = SystemTime::now();
        for (i, pl) in p.playlists.iter().enumerate() {
            let reports: Vec<RenditionReport> = if pl.is_ended() {
                Vec::new()
            } else {
                p.playlists
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, sib)| RenditionReport {
                        uri: format!("../{}/playlist.m3u8", sib.rendition().dir),
                        last: sib.status().last_part(),
                    })
                    .collect()
            };
            // Rendered once per publication; every answer shares these bytes.
            let full = Bytes::from(pl.render(false, &reports));
            let delta =
                (pl.skippable_segments() > 0).then(|| Bytes::from(pl.render(true, &reports)));
            if let Some(tx) = self.tx.get(i) {
                tx.send_replace(Arc::new(Snapshot {
                    room: self.room,
                    status: pl.status(),
                    hint: pl.preload_hint(),
                    wire_full: render_blocking_answer(&full, now),
                    wire_delta: delta.as_ref().map(|d| render_blocking_answer(d, now)),
                    full,
                    delta,
                    published_at: now,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_the_last_segments() {
        let mut c = ObjectCache::default();
        for msn in 0..10u64 {
            c.insert(msn, format!("seg{msn}"), Bytes::from_static(b"x"));
        }
        assert!(c.objects.contains_key("seg9"));
        assert!(c.objects.contains_key("seg5"));
        assert!(!c.objects.contains_key("seg4"));
        assert_eq!(c.objects.len(), 5);
    }
}
