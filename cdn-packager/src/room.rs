//! Per-room driver: feeds the sans-IO segmenter and playlist, writes files atomically, and
//! publishes playlist snapshots to blocked HTTP requests through a `watch` channel.

use crate::fmp4::{init_segment, MuxError};
use crate::metrics::Metrics;
use crate::playlist::{
    part_name, render_multivariant, segment_name, MediaPlaylist, PlaylistError, PlaylistStatus,
    OPUS, RENDITIONS,
};
use crate::segmenter::{ProgramFrame, Segmenter, SegmenterOutput};
use amphi_protocol::RoomId;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokio::sync::watch;

/// A published playlist state.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// What blocking reloads decide on.
    pub status: PlaylistStatus,
    /// The part named by `EXT-X-PRELOAD-HINT`.
    pub hint: Option<(u64, u32)>,
    /// The full playlist.
    pub full: String,
    /// The delta update (`_HLS_skip=YES`), when it skips anything.
    pub delta: Option<String>,
}

/// Why a room update failed.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// Writing a file failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// Muxing failed.
    #[error("mux: {0}")]
    Mux(#[from] MuxError),
    /// The playlist refused an update (a bug: parts out of order).
    #[error("playlist: {0}")]
    Playlist(#[from] PlaylistError),
}

/// Directory of a room: `{data_dir}/hls/{room}`.
pub fn room_dir(data_dir: &Path, room: RoomId) -> PathBuf {
    data_dir.join("hls").join(room.to_string())
}

/// Write `bytes` to `path` through a temporary file and a rename, so readers never see a
/// partial file.
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Highest media sequence number among `seg{N}.m4s` / `part{N}.{M}.m4s` files in `dir`.
async fn highest_msn_on_disk(dir: &Path) -> io::Result<Option<u64>> {
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut max = None;
    while let Some(entry) = rd.next_entry().await? {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".m4s") else {
            continue;
        };
        let digits = if let Some(n) = stem.strip_prefix("seg") {
            n
        } else if let Some(n) = stem.strip_prefix("part") {
            n.split('.').next().unwrap_or("")
        } else {
            continue;
        };
        if let Ok(msn) = digits.parse::<u64>() {
            max = max.max(Some(msn));
        }
    }
    Ok(max)
}

/// The state of one room, behind the room's async mutex.
pub struct RoomCore {
    room: RoomId,
    dir: PathBuf,
    segmenter: Segmenter,
    playlist: MediaPlaylist,
    active_stream: Option<u64>,
    end_requested: bool,
    tx: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl RoomCore {
    /// Room id.
    pub fn room(&self) -> RoomId {
        self.room
    }

    /// A program stream (generation `gen`) started. A still-active older stream is superseded.
    pub async fn start_stream(&mut self, gen: u64) -> Result<(), RoomError> {
        if self.playlist.is_ended() {
            return Ok(());
        }
        if let Some(old) = self.active_stream.replace(gen) {
            tracing::info!(room = %self.room, old, new = gen, "program stream superseded");
            let out = self.segmenter.stream_stopped()?;
            self.apply(out).await?;
        }
        Ok(())
    }

    /// One program frame of stream `gen`. Frames of superseded streams or ended rooms are dropped.
    pub async fn frame(
        &mut self,
        gen: u64,
        frame: ProgramFrame<'_>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), RoomError> {
        if self.playlist.is_ended() || self.active_stream != Some(gen) {
            return Ok(());
        }
        let out = self.segmenter.push(frame, now, wall)?;
        if !out.is_empty() {
            self.apply(out).await?;
        }
        Ok(())
    }

    /// Stream `gen` finished or broke: the program stopped (or, after `RoomEnded`, the room ended).
    pub async fn stream_finished(&mut self, gen: u64) -> Result<(), RoomError> {
        if self.active_stream != Some(gen) {
            return Ok(());
        }
        self.active_stream = None;
        if self.playlist.is_ended() {
            return Ok(());
        }
        let out = self.segmenter.stream_stopped()?;
        self.apply(out).await?;
        if self.end_requested {
            self.finish().await?;
        }
        Ok(())
    }

    /// The origin said the room ended. Finishes now if no program stream is running, otherwise
    /// when it finishes (or on [`RoomCore::force_end`]).
    pub async fn room_ended(&mut self) -> Result<(), RoomError> {
        self.end_requested = true;
        if self.active_stream.is_none() {
            self.finish().await?;
        }
        Ok(())
    }

    /// End the room now, flushing a still-running stream.
    pub async fn force_end(&mut self) -> Result<(), RoomError> {
        self.active_stream = None;
        self.finish().await
    }

    async fn finish(&mut self) -> Result<(), RoomError> {
        if self.playlist.is_ended() {
            return Ok(());
        }
        let out = self.segmenter.stream_stopped()?;
        self.apply(out).await?;
        self.playlist.end();
        self.publish().await?;
        self.metrics.rooms_live.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(room = %self.room, "room ended: playlist finished with EXT-X-ENDLIST");
        Ok(())
    }

    async fn apply(&mut self, outputs: Vec<SegmenterOutput>) -> Result<(), RoomError> {
        if outputs.is_empty() {
            return Ok(());
        }
        let mut arrivals = Vec::with_capacity(2);
        for o in outputs {
            match o {
                SegmenterOutput::Part(p) => {
                    write_atomic(&self.dir.join(part_name(p.msn, p.index)), &p.bytes).await?;
                    self.playlist
                        .add_part(p.msn, p.index, p.frames, p.segment_start)?;
                    arrivals.push(p.last_arrival);
                }
                SegmenterOutput::Segment(s) => {
                    write_atomic(&self.dir.join(segment_name(s.msn)), &s.bytes).await?;
                    self.playlist.complete_segment(s.msn)?;
                    self.metrics
                        .segments_published
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.publish().await?;
        let now = Instant::now();
        for a in arrivals {
            self.metrics.parts_published.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .observe_publish_delay(now.saturating_duration_since(a));
        }
        Ok(())
    }

    async fn publish(&mut self) -> io::Result<()> {
        let full = self.playlist.render(false);
        let delta = (self.playlist.skippable_segments() > 0).then(|| self.playlist.render(true));
        write_atomic(&self.dir.join("playlist.m3u8"), full.as_bytes()).await?;
        self.tx.send_replace(Arc::new(Snapshot {
            status: self.playlist.status(),
            hint: self.playlist.preload_hint(),
            full,
            delta,
        }));
        Ok(())
    }
}

/// A room as the HTTP side sees it.
pub struct RoomHandle {
    /// The writer side.
    pub core: tokio::sync::Mutex<RoomCore>,
    /// Playlist snapshots; `wait_for` on a clone to block.
    pub rx: watch::Receiver<Arc<Snapshot>>,
}

/// Every room this packager has seen since it started.
pub struct Registry {
    data_dir: PathBuf,
    metrics: Arc<Metrics>,
    rooms: Mutex<HashMap<RoomId, Arc<RoomHandle>>>,
}

impl Registry {
    /// An empty registry writing under `{data_dir}/hls`.
    pub fn new(data_dir: PathBuf, metrics: Arc<Metrics>) -> Self {
        Registry {
            data_dir,
            metrics,
            rooms: Mutex::new(HashMap::new()),
        }
    }

    /// Data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A known room.
    pub fn get(&self, room: RoomId) -> Option<Arc<RoomHandle>> {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room)
            .cloned()
    }

    /// A known room, or a new one: its directory, `init.mp4`, `index.m3u8` and an empty
    /// playlist are written before it becomes visible. Numbering continues after any segment
    /// already on disk (a packager restart), as a discontinuity.
    pub async fn get_or_open(&self, room: RoomId) -> Result<Arc<RoomHandle>, RoomError> {
        if let Some(h) = self.get(room) {
            return Ok(h);
        }
        let base = room_dir(&self.data_dir, room);
        let dir = base.join(OPUS.dir);
        tokio::fs::create_dir_all(&dir).await?;
        let start_msn = highest_msn_on_disk(&dir).await?.map(|m| m + 1);
        write_atomic(&dir.join("init.mp4"), &init_segment()?).await?;
        write_atomic(
            &base.join("index.m3u8"),
            render_multivariant(RENDITIONS).as_bytes(),
        )
        .await?;
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut core = RoomCore {
            room,
            dir,
            segmenter: match start_msn {
                Some(msn) => Segmenter::default().resume_at(msn),
                None => Segmenter::default(),
            },
            playlist: MediaPlaylist::starting_at(start_msn.unwrap_or(0)),
            active_stream: None,
            end_requested: false,
            tx,
            metrics: self.metrics.clone(),
        };
        core.publish().await?;
        let handle = Arc::new(RoomHandle {
            core: tokio::sync::Mutex::new(core),
            rx,
        });
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rooms.entry(room).or_insert_with(|| {
            self.metrics.rooms_total.fetch_add(1, Ordering::Relaxed);
            self.metrics.rooms_live.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%room, ?start_msn, "room opened");
            handle
        });
        Ok(entry.clone())
    }
}
