//! The room's recording: the durable index chunks stored after each segment, the VOD playlists,
//! chapters and `recording.json` written when the room ends, and reading them back when a
//! restarted packager resumes a room.

use super::{key, rkey, Registry, RoomHandle};
use crate::chapters::{CHAPTERS_JSON, CHAPTERS_VTT};
use crate::metrics::Metrics;
use crate::playlist::{multivariants, Rendition};
use crate::recording_index::{
    chunk_name, chunk_of, parse_chunk, parse_turns, plan_resume, render_chunk, Resume, TURNS_FILE,
};
use crate::speakers::SpeakerTimeline;
use crate::storage::{ObjectMeta, Storage, StorageError};
use crate::upload::{Job, Publish};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

impl RoomHandle {
    /// The recording index chunks of rendition `ri` to store once segment `msn` completed: its
    /// chunk, and those of the segments before it back to the last one with media (gaps listed
    /// on resume are stored with the first segment after them).
    pub(super) fn index_chunks(&self, ri: usize, msn: u64) -> Vec<(String, Bytes)> {
        let p = self.published();
        let Some(pl) = p.playlists.get(ri) else {
            return Vec::new();
        };
        let history = pl.history();
        let last = chunk_of(msn);
        let mut first = last;
        for s in history.iter().rev().skip(1) {
            first = first.min(chunk_of(s.msn));
            if !s.gap {
                break;
            }
        }
        (first..=last)
            .map(|c| {
                (
                    rkey(self.room, pl.rendition(), &chunk_name(c)),
                    Bytes::from(render_chunk(history, c)),
                )
            })
            .collect()
    }

    /// The room ended: end the playlists (listeners see `EXT-X-ENDLIST` now) and queue the
    /// recording: final playlists, VOD playlists, the recording's multivariant playlist and
    /// `recording.json` (last: once it is stored the recording is ready).
    pub(super) fn finish_recording(&self, spans: &[crate::speakers::SpeakerSpan]) -> Vec<Job> {
        let room = self.room;
        let mut p = self.published();
        let mut jobs = Vec::new();
        for pl in &mut p.playlists {
            pl.end();
        }
        let segments = p.playlists.first().map_or(0, |pl| pl.history().len());
        let ticks: u64 = p
            .playlists
            .first()
            .map_or(0, |pl| pl.history().iter().map(|h| h.duration).sum());
        let put = |key: String, text: String, meta: ObjectMeta| Job::Put {
            key,
            body: Bytes::from(text),
            meta,
            publish: Publish::Nothing,
        };
        for pl in &p.playlists {
            let r = pl.rendition();
            jobs.push(put(
                rkey(room, r, "playlist.m3u8"),
                pl.render(false, &[]),
                ObjectMeta::PLAYLIST,
            ));
            if segments > 0 {
                jobs.push(put(
                    rkey(room, r, "vod.m3u8"),
                    pl.render_vod(spans),
                    ObjectMeta::PLAYLIST,
                ));
            }
        }
        if segments > 0 {
            // Chapters for podcast players, beside the recording's multivariant playlist.
            let history = p.playlists.first().map_or(&[][..], |pl| pl.history());
            let chapters = crate::chapters::chapters(spans, history);
            jobs.push(put(
                key(room, CHAPTERS_JSON),
                crate::chapters::render_json(&chapters),
                ObjectMeta::JSON,
            ));
            jobs.push(put(
                key(room, CHAPTERS_VTT),
                crate::chapters::render_vtt(&chapters),
                ObjectMeta::VTT,
            ));
            for (name, text) in multivariants(self.renditions, "recording", "vod.m3u8") {
                jobs.push(put(key(room, &name), text, ObjectMeta::PLAYLIST));
            }
        }
        let meta = serde_json::json!({
            "room": room.to_string(),
            "ended_at": unix_secs(SystemTime::now()),
            "segments": segments,
            "duration_secs": ticks as f64 / 48_000.0,
            "speaker_turns": spans.len(),
        });
        jobs.push(Job::Put {
            key: key(room, "recording.json"),
            body: Bytes::from(meta.to_string()),
            meta: ObjectMeta::JSON,
            publish: Publish::RecordingStored {
                has_media: segments > 0,
            },
        });
        self.send_snapshots(&p);
        drop(p);
        self.announce();
        jobs
    }

    /// The recording's last object is stored.
    pub(super) fn recording_stored(&self, has_media: bool, metrics: &Metrics) {
        self.recording_ready.store(has_media, Ordering::Relaxed);
        self.finished.store(true, Ordering::Relaxed);
        let p = self.published();
        self.send_snapshots(&p);
        drop(p);
        self.announce();
        self.hook.finished(self.room);
        metrics.rooms_live.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(room = %self.room, has_media, "room ended: EXT-X-ENDLIST and VOD recording stored");
    }
}

/// Seconds since the Unix epoch.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Where rendition `r` of `room` resumes after a packager restart: its durable recording
    /// index plus the media files stored (`None`: nothing stored, a new room). A chunk that
    /// cannot be read is skipped (its segments are then bridged as gaps or dropped).
    pub(super) async fn resume_point(
        &self,
        room: RoomId,
        r: Rendition,
    ) -> Result<Option<Resume>, StorageError> {
        let keys = self.store.list(&rkey(room, r, "")).await?;
        let index_prefix = rkey(room, r, "index/");
        let mut indexed = Vec::new();
        for k in keys.iter().filter(|k| k.starts_with(&index_prefix)) {
            let parsed = match self.store.get(k).await? {
                Some(b) => parse_chunk(b),
                None => continue,
            };
            match parsed {
                Ok(mut segments) => indexed.append(&mut segments),
                Err(e) => {
                    tracing::warn!(%room, key = %k, error = %e, "recording index chunk skipped")
                }
            }
        }
        let names = keys.iter().filter_map(|k| k.rsplit('/').next());
        Ok(plan_resume(indexed, names, r.part_target_ticks))
    }

    /// The speaker turns stored before a packager restart (none if unreadable).
    pub(super) async fn stored_turns(&self, room: RoomId) -> SpeakerTimeline {
        let stored = match self.store.get(&key(room, TURNS_FILE)).await {
            Ok(Some(b)) => b,
            Ok(None) => return SpeakerTimeline::new(),
            Err(e) => {
                tracing::warn!(%room, error = %e, "cannot read the stored speaker turns");
                return SpeakerTimeline::new();
            }
        };
        match parse_turns(stored) {
            Ok(spans) => SpeakerTimeline::resume(spans),
            Err(e) => {
                tracing::warn!(%room, error = %e, "stored speaker turns skipped");
                SpeakerTimeline::new()
            }
        }
    }
}
