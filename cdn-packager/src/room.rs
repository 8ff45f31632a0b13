//! Per-room driver. The ingest side ([`RoomCore`]) feeds the sans-IO segmenter, the AAC
//! rendition and the speaker timeline and queues what they produce; the room's uploader task
//! stores each object in order and only then publishes it: playlists are updated, snapshots go
//! to blocked HTTP requests through `watch` channels, recent objects stay in a small memory
//! cache for the HTTP origin.

#[cfg(feature = "aac")]
use crate::aac::AacRendition;
use crate::fmp4::{init_segment, MuxError};
use crate::h1::{release_waiters, render_blocking_answer, Waiter};
use crate::metrics::Metrics;
use crate::playlist::{
    part_name, render_multivariant, renditions, segment_name, MediaPlaylist, PlaylistError,
    PlaylistStatus, Rendition, RenditionReport,
};
use crate::recording_index::{
    chunk_name, chunk_of, parse_chunk, parse_turns, plan_resume, render_chunk, render_turns,
    Resume, TURNS_FILE,
};
use crate::segmenter::{ProgramFrame, Segmenter, SegmenterOutput};
use crate::speakers::SpeakerTimeline;
use crate::storage::{ObjectMeta, Storage, StorageError, Store};
use crate::upload::{Backoff, Job, Publish, UploadQueue};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Segments whose parts and segment stay in the memory cache.
const CACHE_SEGMENTS: u64 = 4;

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
    pub fn wire(&self, skip: bool) -> Bytes {
        match (&self.wire_delta, skip) {
            (Some(d), true) => d.clone(),
            _ => self.wire_full.clone(),
        }
    }

    fn empty(room: RoomId) -> Self {
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
}

/// Storage key of a room's file.
pub fn key(room: RoomId, rest: &str) -> String {
    format!("{room}/{rest}")
}

/// Storage key of a rendition's file.
pub fn rkey(room: RoomId, r: Rendition, file: &str) -> String {
    format!("{room}/{}/{file}", r.dir)
}

/// The ingest side of a room, behind the room's mutex.
pub struct RoomCore {
    room: RoomId,
    renditions: &'static [Rendition],
    segmenter: Segmenter,
    #[cfg(feature = "aac")]
    aac: Option<AacRendition>,
    speakers: SpeakerTimeline,
    active_stream: Option<u64>,
    end_requested: bool,
    finished: bool,
    queue: Arc<UploadQueue>,
}

impl RoomCore {
    /// Room id.
    pub fn room(&self) -> RoomId {
        self.room
    }

    /// A program stream (generation `gen`) started. A still-active older stream is superseded.
    pub fn start_stream(&mut self, gen: u64) -> Result<(), RoomError> {
        if self.finished {
            return Ok(());
        }
        if let Some(old) = self.active_stream.replace(gen) {
            tracing::info!(room = %self.room, old, new = gen, "program stream superseded");
            self.stop()?;
        }
        Ok(())
    }

    /// One program frame of stream `gen` (`speaker`: the loudest speaker's id, 0 if none).
    /// Frames of superseded streams or ended rooms are dropped.
    pub fn frame(
        &mut self,
        gen: u64,
        frame: ProgramFrame<'_>,
        speaker: u32,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), RoomError> {
        if self.finished || self.active_stream != Some(gen) {
            return Ok(());
        }
        let out = self.segmenter.push(frame, now, wall)?;
        if let Some(at) = self.segmenter.last_program_time() {
            self.speakers.push(speaker, at);
        }
        #[cfg(feature = "aac")]
        if let (Some(aac), Some(ext)) = (&mut self.aac, self.segmenter.last_ext()) {
            aac.push_opus(frame.payload, ext)?;
        }
        self.enqueue(out)
    }

    fn stop(&mut self) -> Result<(), RoomError> {
        let out = self.segmenter.stream_stopped()?;
        self.speakers.stop();
        self.enqueue(out)
    }

    fn enqueue(&mut self, outputs: Vec<SegmenterOutput>) -> Result<(), RoomError> {
        for o in outputs {
            #[cfg(feature = "aac")]
            let aac = match &mut self.aac {
                Some(a) => a.follow(&o)?,
                None => None,
            };
            let segment_done = matches!(o, SegmenterOutput::Segment(_));
            self.push_output(0, o);
            #[cfg(feature = "aac")]
            if let Some(a) = aac {
                self.push_output(1, a);
            }
            if segment_done {
                self.store_turns();
            }
        }
        Ok(())
    }

    /// Queue the speaker turns so far (with the one in progress) for storage: a restarted
    /// packager reads them back into the room's recording.
    fn store_turns(&self) {
        let spans = self.speakers.spans();
        if spans.is_empty() {
            return;
        }
        self.queue.push(Job::Put {
            key: key(self.room, TURNS_FILE),
            body: Bytes::from(render_turns(&spans)),
            meta: ObjectMeta::INDEX,
            publish: Publish::Nothing,
        });
    }

    fn push_output(&self, ri: usize, o: SegmenterOutput) {
        let Some(r) = self.renditions.get(ri).copied() else {
            return;
        };
        let job = match o {
            SegmenterOutput::Part(p) => Job::Put {
                key: rkey(self.room, r, &part_name(p.msn, p.index)),
                body: Bytes::from(p.bytes),
                meta: ObjectMeta::MEDIA,
                publish: Publish::Part {
                    rendition: ri,
                    msn: p.msn,
                    index: p.index,
                    duration: p.duration,
                    start: p.segment_start,
                    arrival: p.last_arrival,
                },
            },
            SegmenterOutput::Segment(s) => Job::Put {
                key: rkey(self.room, r, &segment_name(s.msn)),
                body: Bytes::from(s.bytes),
                meta: ObjectMeta::MEDIA,
                publish: Publish::Segment {
                    rendition: ri,
                    msn: s.msn,
                    start: s.start,
                    duration: s.duration,
                },
            },
        };
        self.queue.push(job);
    }

    /// Stream `gen` finished or broke: the program stopped (or, after `RoomEnded`, the room ended).
    pub fn stream_finished(&mut self, gen: u64) -> Result<(), RoomError> {
        if self.active_stream != Some(gen) {
            return Ok(());
        }
        self.active_stream = None;
        if self.finished {
            return Ok(());
        }
        self.stop()?;
        if self.end_requested {
            self.finish()?;
        }
        Ok(())
    }

    /// The origin said the room ended. Finishes now if no program stream is running, otherwise
    /// when it finishes (or on [`RoomCore::force_end`]).
    pub fn room_ended(&mut self) -> Result<(), RoomError> {
        self.end_requested = true;
        if self.active_stream.is_none() {
            self.finish()?;
        }
        Ok(())
    }

    /// End the room now, flushing a still-running stream.
    pub fn force_end(&mut self) -> Result<(), RoomError> {
        self.active_stream = None;
        self.finish()
    }

    fn finish(&mut self) -> Result<(), RoomError> {
        if self.finished {
            return Ok(());
        }
        self.stop()?;
        self.finished = true;
        self.queue.push(Job::End {
            spans: self.speakers.spans(),
        });
        self.queue.close();
        tracing::info!(room = %self.room, "room ended: finishing playlists and the recording");
        Ok(())
    }
}

/// Recently stored objects, served without a storage round trip.
#[derive(Debug, Default)]
struct ObjectCache {
    objects: HashMap<String, Bytes>,
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
struct Published {
    playlists: Vec<MediaPlaylist>,
    cache: ObjectCache,
    /// Init segments (kept for the room's life).
    inits: HashMap<String, Bytes>,
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
    /// Blocking reloads held by the plain HTTP/1.1 fast path, per rendition.
    pub waiters: Vec<Mutex<Vec<Waiter>>>,
    queue: Arc<UploadQueue>,
    /// The recording (VOD playlists) is stored.
    pub recording_ready: AtomicBool,
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

    /// The recording index chunks of rendition `ri` to store once segment `msn` completed: its
    /// chunk, and those of the segments before it back to the last one with media (gaps listed
    /// on resume are stored with the first segment after them).
    fn index_chunks(&self, ri: usize, msn: u64) -> Vec<(String, Bytes)> {
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

    /// Apply a stored object's publication and send new snapshots.
    fn publish(&self, key: String, body: Bytes, what: Publish, metrics: &Metrics) {
        let mut p = self.published();
        let result = match what {
            Publish::Nothing => {
                if key.ends_with("init.mp4") {
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
                p.cache.insert(msn, key, body);
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
                p.cache.insert(msn, key, body);
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
        self.release_waiters(metrics);
    }

    /// Answer the fast path's held requests that the current snapshots satisfy.
    fn release_waiters(&self, metrics: &Metrics) {
        for (ri, rx) in self.rx.iter().enumerate() {
            let snap = rx.borrow().clone();
            release_waiters(self, ri, &snap, metrics);
        }
    }

    fn send_snapshots(&self, p: &Published) {
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

/// Put with retries and backoff until stored or shut down. `Err` only on shutdown or a
/// permanent error (bad key).
async fn put_retrying(
    store: &Store,
    key: &str,
    body: &Bytes,
    meta: ObjectMeta,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), StorageError> {
    let mut backoff = Backoff::default();
    let mut first_failure = None;
    loop {
        let attempt = Instant::now();
        let put = store.put(key, body.clone(), meta).await;
        metrics.observe_upload(attempt.elapsed());
        match put {
            Ok(()) => {
                if let Some(since) = first_failure {
                    metrics.storage_outage.store(0, Ordering::Relaxed);
                    tracing::info!(
                        key,
                        retries = backoff.failures(),
                        outage_ms =
                            Instant::now().saturating_duration_since(since).as_millis() as u64,
                        "storage reachable again; flushing buffered uploads"
                    );
                }
                metrics.storage_puts.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e @ StorageError::BadKey(_)) => return Err(e),
            Err(e) => {
                metrics.storage_errors.fetch_add(1, Ordering::Relaxed);
                if first_failure.is_none() {
                    first_failure = Some(Instant::now());
                    metrics.storage_outage.store(1, Ordering::Relaxed);
                    tracing::warn!(
                        key,
                        error = %e,
                        buffered_bytes = metrics.storage_buffered_bytes.load(Ordering::Relaxed),
                        "storage put failed; buffering uploads and retrying"
                    );
                }
                let wait = backoff.fail();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => metrics.storage_retry(),
                    _ = shutdown.cancelled() => return Err(e),
                }
            }
        }
    }
}

/// The room's uploader: drains its queue in order until the room's `End` job is done.
async fn uploader(
    handle: Arc<RoomHandle>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let room = handle.room;
    loop {
        let job = tokio::select! {
            j = handle.queue.next() => j,
            _ = shutdown.cancelled() => None,
        };
        let Some(job) = job else { break };
        match &job {
            Job::Put {
                key,
                body,
                meta,
                publish,
            } => {
                match put_retrying(&store, key, body, *meta, &metrics, &shutdown).await {
                    Ok(()) => {
                        let segment_done = matches!(publish, Publish::Segment { .. });
                        handle.publish(key.clone(), body.clone(), publish.clone(), &metrics);
                        if let (true, Publish::Segment { rendition, msn, .. }) =
                            (segment_done, publish)
                        {
                            // The durable recording index, then a copy of the live playlist
                            // (inspection, and serving it once the room is gone).
                            let r = handle.renditions[*rendition];
                            let mut writes: Vec<(String, Bytes, ObjectMeta)> = handle
                                .index_chunks(*rendition, *msn)
                                .into_iter()
                                .map(|(k, b)| (k, b, ObjectMeta::INDEX))
                                .collect();
                            let text = handle.rx[*rendition].borrow().full.clone();
                            writes.push((
                                rkey(room, r, "playlist.m3u8"),
                                text,
                                ObjectMeta::PLAYLIST,
                            ));
                            for (k, body, meta) in writes {
                                let _ = put_retrying(&store, &k, &body, meta, &metrics, &shutdown)
                                    .await;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(%room, key, error = %e, "upload abandoned");
                    }
                }
            }
            Job::End { spans } => {
                if let Err(e) = finish_recording(&handle, &store, spans, &metrics, &shutdown).await
                {
                    tracing::error!(%room, error = %e, "writing the recording failed");
                }
            }
        }
        handle.queue.done(&job);
    }
}

/// Seconds since the Unix epoch.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn finish_recording(
    handle: &RoomHandle,
    store: &Store,
    spans: &[crate::playlist::SpeakerSpan],
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), StorageError> {
    let room = handle.room;
    let (texts, segments, ticks) = {
        let mut p = handle.published();
        let mut texts = Vec::new();
        for pl in &mut p.playlists {
            pl.end();
            texts.push((pl.rendition(), pl.render(false, &[]), pl.render_vod(spans)));
        }
        let segments = p.playlists.first().map_or(0, |pl| pl.history().len());
        let ticks: u64 = p
            .playlists
            .first()
            .map_or(0, |pl| pl.history().iter().map(|h| h.duration).sum());
        (texts, segments, ticks)
    };
    for (r, live, vod) in &texts {
        put_retrying(
            store,
            &rkey(room, *r, "playlist.m3u8"),
            &Bytes::from(live.clone()),
            ObjectMeta::PLAYLIST,
            metrics,
            shutdown,
        )
        .await?;
        if segments > 0 {
            put_retrying(
                store,
                &rkey(room, *r, "vod.m3u8"),
                &Bytes::from(vod.clone()),
                ObjectMeta::PLAYLIST,
                metrics,
                shutdown,
            )
            .await?;
        }
    }
    if segments > 0 {
        let mv = render_multivariant(handle.renditions, "vod.m3u8");
        put_retrying(
            store,
            &key(room, "recording.m3u8"),
            &Bytes::from(mv),
            ObjectMeta::PLAYLIST,
            metrics,
            shutdown,
        )
        .await?;
    }
    let meta = serde_json::json!({
        "room": room.to_string(),
        "ended_at": unix_secs(SystemTime::now()),
        "segments": segments,
        "duration_secs": ticks as f64 / 48_000.0,
        "speaker_turns": spans.len(),
    });
    put_retrying(
        store,
        &key(room, "recording.json"),
        &Bytes::from(meta.to_string()),
        ObjectMeta::JSON,
        metrics,
        shutdown,
    )
    .await?;
    handle
        .recording_ready
        .store(segments > 0, Ordering::Relaxed);
    let p = handle.published();
    handle.send_snapshots(&p);
    drop(p);
    handle.release_waiters(metrics);
    metrics.rooms_live.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(%room, segments, "room ended: EXT-X-ENDLIST and VOD recording stored");
    Ok(())
}

/// Every room this packager has seen since it started.
pub struct Registry {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    max_buffer: usize,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    rooms: Mutex<HashMap<RoomId, Arc<RoomHandle>>>,
}

impl Registry {
    /// An empty registry storing into `store`; uploader tasks run on `tasks` until `shutdown`.
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        max_buffer: usize,
        shutdown: CancellationToken,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        Registry {
            store,
            metrics,
            max_buffer,
            shutdown,
            tasks,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    /// The storage backend.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A known room.
    pub fn get(&self, room: RoomId) -> Option<Arc<RoomHandle>> {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room)
            .cloned()
    }

    /// Where rendition `r` of `room` resumes after a packager restart: its durable recording
    /// index plus the media files stored (`None`: nothing stored, a new room). A chunk that
    /// cannot be read is skipped (its segments are then bridged as gaps or dropped).
    async fn resume_point(
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
    async fn stored_turns(&self, room: RoomId) -> SpeakerTimeline {
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

    /// A known room, or a new one: its init segments and multivariant playlist are queued
    /// first, and its uploader started. After a packager restart the room resumes from its
    /// durable recording index: the live playlist and the recording keep the segments (and the
    /// speaker turns) from before, numbering continues after anything already stored, and the
    /// next segment is a discontinuity.
    pub async fn get_or_open(&self, room: RoomId) -> Result<Arc<RoomHandle>, RoomError> {
        if let Some(h) = self.get(room) {
            return Ok(h);
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
        let queue = Arc::new(UploadQueue::new(
            room,
            self.max_buffer,
            self.metrics.clone(),
        ));
        queue.push(Job::Put {
            key: rkey(room, rends[0], "init.mp4"),
            body: Bytes::from(init_segment()?),
            meta: ObjectMeta::MEDIA,
            publish: Publish::Nothing,
        });
        #[cfg(feature = "aac")]
        let aac = {
            let a = AacRendition::new()?;
            if let Some(r) = rends.get(1) {
                queue.push(Job::Put {
                    key: rkey(room, *r, "init.mp4"),
                    body: Bytes::from(a.init_segment()?),
                    meta: ObjectMeta::MEDIA,
                    publish: Publish::Nothing,
                });
            }
            Some(a)
        };
        queue.push(Job::Put {
            key: key(room, "index.m3u8"),
            body: Bytes::from(render_multivariant(rends, "playlist.m3u8")),
            meta: ObjectMeta::PLAYLIST,
            publish: Publish::Nothing,
        });
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
        let core = RoomCore {
            room,
            renditions: rends,
            segmenter: match start_msn {
                Some(msn) => Segmenter::default().resume_at(msn, media_end),
                None => Segmenter::default(),
            },
            #[cfg(feature = "aac")]
            aac,
            speakers: match start_msn {
                Some(_) => self.stored_turns(room).await,
                None => SpeakerTimeline::new(),
            },
            active_stream: None,
            end_requested: false,
            finished: false,
            queue: queue.clone(),
        };
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
            waiters: rends.iter().map(|_| Mutex::new(Vec::new())).collect(),
            queue,
            recording_ready: AtomicBool::new(false),
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
            self.store.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        Ok(handle)
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
