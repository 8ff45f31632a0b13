//! Ordered uploads to storage, sans-IO. Each room has one [`Lane`]: a FIFO of jobs (parts,
//! segments, playlists, the end of the room). Media objects (parts, segments, init segments)
//! go up concurrently, up to [`MAX_IN_FLIGHT`] at once, because one room makes ~12 objects a
//! second and storage answers in tens of milliseconds (one at a time, a room falls behind for
//! good as soon as a PUT takes more than ~80 ms). Every other object (a copy of a playlist, a
//! recording index chunk, the recording's files) is an *ordering barrier*: it starts only once
//! everything queued before it is stored, so it is never stored before the media it lists, and
//! two versions of one key are stored in order.
//!
//! Publication (the live playlist lists an object, the HTTP origin serves it) follows the same
//! order and normally waits until the object is stored, so a CDN reading media from storage is
//! never sent to a missing object. When storage fails, or an upload hangs for longer than
//! [`STALL_AFTER`], the lane is *degraded*: everything queued is published at once and served
//! by the packager itself (recent objects from memory), so the live edge keeps moving through
//! a storage outage; uploads go on being retried with exponential backoff in the background.
//!
//! Memory is bounded across all rooms by one [`MemoryBudget`]: a job whose bytes do not fit is
//! *spilled* (the driver writes it to the spill directory and drops it from memory; see
//! [`encode_spill`]); nothing is ever dropped. Every decision here takes an explicit `now`.

use crate::segmenter::SegmentStart;
use crate::speakers::SpeakerSpan;
use crate::storage::ObjectMeta;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// First retry delay.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// An upload in flight this long without an answer degrades the lane (publication stops
/// waiting for storage).
pub const STALL_AFTER: Duration = Duration::from_secs(1);
/// Uploads of one lane in flight at once (one, the probe, during an outage).
pub const MAX_IN_FLIGHT: usize = 8;
/// How far past the oldest unstored job [`Lane::poll`] looks for one that may start.
const LOOKAHEAD: usize = 64;
/// Default of `upload_memory_budget_bytes`: bytes of pending uploads kept in memory over all
/// rooms before new ones spill to disk.
pub const DEFAULT_MEMORY_BUDGET: usize = 64 << 20;

/// Sans-IO exponential backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: MIN_BACKOFF,
            failures: 0,
        }
    }
}

impl Backoff {
    /// A failure: how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        self.failures += 1;
        d
    }
    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
    /// A success: start over.
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Bytes of pending uploads held in memory, shared by every room's lane.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Take `n` bytes if they fit.
    pub fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    /// Give back `n` reserved bytes.
    pub fn release(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Bytes reserved.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What storing an object makes public.
#[derive(Clone, Debug, PartialEq)]
pub enum Publish {
    /// Nothing (init segments, playlists).
    Nothing,
    /// A part of rendition `rendition` (index in the room's renditions).
    Part {
        /// Rendition index.
        rendition: usize,
        /// Parent segment.
        msn: u64,
        /// Part index.
        index: u32,
        /// Duration in ticks.
        duration: u32,
        /// Present on part 0.
        start: Option<SegmentStart>,
        /// When its last frame arrived (publish-delay metric).
        arrival: Instant,
    },
    /// A segment of rendition `rendition`.
    Segment {
        /// Rendition index.
        rendition: usize,
        /// Media sequence number.
        msn: u64,
        /// Start and discontinuity flag.
        start: SegmentStart,
        /// Duration in ticks.
        duration: u64,
    },
    /// The last object of the room's recording: once stored, the recording is ready.
    RecordingStored {
        /// The recording lists segments (a VOD playlist was written).
        has_media: bool,
    },
}

/// One unit of work for the uploader.
#[derive(Clone, Debug)]
pub enum Job {
    /// Store `body` under `key`, then publish.
    Put {
        /// Storage key.
        key: String,
        /// Object bytes.
        body: Bytes,
        /// Content type and cache control.
        meta: ObjectMeta,
        /// What becomes public once stored.
        publish: Publish,
    },
    /// The room ended: finish the playlists and write the recording.
    End {
        /// Speaker turns for `EXT-X-DATERANGE`.
        spans: Vec<SpeakerSpan>,
    },
}

impl Job {
    fn bytes(&self) -> usize {
        match self {
            Job::Put { body, .. } => body.len(),
            Job::End { .. } => 0,
        }
    }

    /// Starts only once every job queued before it is stored: anything that is not a media
    /// object (playlists, index chunks, the recording's files) may list earlier objects or
    /// overwrite an earlier version of its key.
    fn is_barrier(&self) -> bool {
        match self {
            Job::Put { meta, publish, .. } => {
                *meta != ObjectMeta::MEDIA || matches!(publish, Publish::RecordingStored { .. })
            }
            Job::End { .. } => false,
        }
    }
}

/// Where a pushed job's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In memory (within the budget), or nothing to hold.
    Memory,
    /// Over the budget: the driver writes the job to the spill file of `seq`, then calls
    /// [`Lane::spilled`].
    Spill {
        /// The job's sequence number in its lane.
        seq: u64,
    },
}

/// What the driver should do next about storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Upload the job `seq` (its bytes: [`Lane::entry`] or its spill file).
    Upload(u64),
    /// Nothing before `at` (a retry is scheduled).
    Wait(Instant),
    /// Nothing to do until a job is pushed or an upload finishes.
    Idle,
}

/// An upload that failed started an outage, or a success ended one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// The first failure: storage is unreachable.
    OutageStarted,
    /// Storage answers again after `lasted` and `retries` failed attempts.
    OutageEnded {
        /// Since the first failure.
        lasted: Duration,
        /// Failed attempts meanwhile.
        retries: u32,
    },
}

/// Jobs finished by [`Lane::take_done`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    /// Memory bytes to give back to the budget.
    pub memory: usize,
    /// Sequence numbers whose spill files can go.
    pub spill_files: Vec<u64>,
}

/// A queued job and its progress.
#[derive(Debug)]
pub struct Entry {
    /// Sequence number in the lane (also the spill file name).
    pub seq: u64,
    /// The job; a spilled job's body is empty (its bytes are in the spill file).
    pub job: Job,
    /// Bytes of the job's body (wherever they are).
    pub len: usize,
    /// The body is in the spill file, not in memory.
    pub spilled: bool,
    /// The body's bytes are counted in the memory budget.
    reserved: bool,
    stored: bool,
    published: bool,
}

/// A room's upload FIFO (see the module documentation).
#[derive(Debug, Default)]
pub struct Lane {
    /// Sequence numbers are consecutive from the front (see [`Lane::index`]).
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// Entries at the front already published (publication is in FIFO order).
    published_prefix: usize,
    /// Uploads started and not answered yet, with when they started.
    in_flight: Vec<(u64, Instant)>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    outage_since: Option<Instant>,
    /// Entries published before they were stored (during an outage or a stall) and not
    /// stored yet: while any is left, publication goes on without waiting for storage, so the
    /// live playlist does not freeze while the backlog drains after an outage.
    published_unstored: usize,
    memory_bytes: usize,
    spilled_bytes: usize,
}

impl Lane {
    /// An empty lane.
    pub fn new() -> Self {
        Lane::default()
    }

    /// Queue `job`: its bytes stay in memory if `budget` has room, else it must be spilled.
    pub fn push(&mut self, job: Job, budget: &MemoryBudget) -> Placement {
        let seq = self.next_seq;
        self.next_seq += 1;
        let len = job.bytes();
        // Nothing to upload for the end marker: it is "stored" as soon as it is queued.
        let stored = matches!(job, Job::End { .. });
        let in_memory = len == 0 || budget.try_reserve(len);
        if in_memory {
            self.memory_bytes += len;
        }
        self.entries.push_back(Entry {
            seq,
            job,
            len,
            spilled: false,
            reserved: in_memory && len > 0,
            stored,
            published: false,
        });
        if in_memory {
            Placement::Memory
        } else {
            Placement::Spill { seq }
        }
    }

    /// Position of job `seq` in `entries` (sequence numbers are consecutive from the front).
    fn index(&self, seq: u64) -> Option<usize> {
        let front = self.entries.front()?.seq;
        let i = usize::try_from(seq.checked_sub(front)?).ok()?;
        (i < self.entries.len()).then_some(i)
    }

    /// The spill file of `seq` is written: drop its bytes from memory. Returns the bytes it
    /// held in the budget (give them back; 0 for a job spilled as it was pushed).
    pub fn spilled(&mut self, seq: u64) -> usize {
        let Some(e) = self.index(seq).and_then(|i| self.entries.get_mut(i)) else {
            return 0;
        };
        if e.spilled {
            return 0;
        }
        if let Job::Put { body, .. } = &mut e.job {
            *body = Bytes::new();
        }
        e.spilled = true;
        self.spilled_bytes += e.len;
        if e.reserved {
            e.reserved = false;
            self.memory_bytes -= e.len;
            e.len
        } else {
            0
        }
    }

    /// A queued job.
    pub fn entry(&self, seq: u64) -> Option<&Entry> {
        self.entries.get(self.index(seq)?)
    }

    /// When the oldest upload in flight started.
    fn oldest_in_flight(&self) -> Option<Instant> {
        self.in_flight.iter().map(|&(_, t)| t).min()
    }

    /// Publication no longer waits for storage: an upload failed and none succeeded since, one
    /// in flight has hung for [`STALL_AFTER`], or what was published meanwhile is still being
    /// stored (the backlog of an outage).
    pub fn degraded(&self, now: Instant) -> bool {
        self.outage_since.is_some()
            || self.published_unstored > 0
            || self
                .oldest_in_flight()
                .is_some_and(|t| now.saturating_duration_since(t) >= STALL_AFTER)
    }

    /// When [`Lane::degraded`] turns true by itself (a stall), if it can.
    pub fn stall_deadline(&self) -> Option<Instant> {
        match self.outage_since {
            None => self.oldest_in_flight().map(|t| t + STALL_AFTER),
            Some(_) => None,
        }
    }

    /// Jobs to publish now, in FIFO order: stored ones, or every queued one while degraded.
    /// Each is returned once.
    pub fn publishable(&mut self, now: Instant) -> Vec<u64> {
        let degraded = self.degraded(now);
        let mut out = Vec::new();
        for e in self.entries.iter_mut().skip(self.published_prefix) {
            if !(e.stored || degraded) {
                break;
            }
            if !e.stored {
                self.published_unstored += 1;
            }
            e.published = true;
            self.published_prefix += 1;
            out.push(e.seq);
        }
        out
    }

    /// The next upload to start at `now`, if one may: media objects up to [`MAX_IN_FLIGHT`] at
    /// once, oldest first; an ordering barrier once everything before it is stored; during an
    /// outage only the oldest unstored job, after its backoff. Call again until it answers
    /// something other than [`Poll::Upload`].
    pub fn poll(&mut self, now: Instant) -> Poll {
        let outage = self.outage_since.is_some();
        let limit = if outage { 1 } else { MAX_IN_FLIGHT };
        if self.in_flight.len() >= limit {
            return Poll::Idle;
        }
        let mut earlier_unstored = false;
        let mut next = None;
        for e in self.entries.iter().take(LOOKAHEAD) {
            if e.stored {
                continue;
            }
            let busy = self.in_flight.iter().any(|&(s, _)| s == e.seq);
            let waits_for_earlier = earlier_unstored && e.job.is_barrier();
            if !busy && !waits_for_earlier {
                next = Some(e.seq);
                break;
            }
            earlier_unstored = true;
            if outage {
                break;
            }
        }
        let Some(seq) = next else {
            return Poll::Idle;
        };
        if let Some(at) = self.retry_at {
            if now < at {
                return Poll::Wait(at);
            }
        }
        self.retry_at = None;
        self.in_flight.push((seq, now));
        Poll::Upload(seq)
    }

    /// The upload of `seq` succeeded; whether that ended an outage.
    pub fn stored(&mut self, seq: u64, now: Instant) -> Transition {
        self.in_flight.retain(|&(s, _)| s != seq);
        if let Some(e) = self.index(seq).and_then(|i| self.entries.get_mut(i)) {
            if !e.stored {
                e.stored = true;
                if e.published {
                    self.published_unstored -= 1;
                }
            }
        }
        let t = match self.outage_since.take() {
            Some(since) => Transition::OutageEnded {
                lasted: now.saturating_duration_since(since),
                retries: self.backoff.failures(),
            },
            None => Transition::None,
        };
        self.backoff.reset();
        t
    }

    /// The upload of `seq` failed (it will be retried after the backoff).
    pub fn failed(&mut self, seq: u64, now: Instant) -> Transition {
        self.in_flight.retain(|&(s, _)| s != seq);
        self.retry_at = Some(now + self.backoff.fail());
        if self.outage_since.is_none() {
            self.outage_since = Some(now);
            Transition::OutageStarted
        } else {
            Transition::None
        }
    }

    /// Forget the jobs at the head that are stored and published. Returns the memory bytes
    /// they held (give them back to the budget) and the spill files to delete.
    pub fn take_done(&mut self) -> Done {
        let mut done = Done::default();
        while self
            .entries
            .front()
            .is_some_and(|e| e.stored && e.published)
        {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.published_prefix -= 1;
            if e.spilled {
                self.spilled_bytes -= e.len;
                done.spill_files.push(e.seq);
            }
            if e.reserved {
                self.memory_bytes -= e.len;
                done.memory += e.len;
            }
        }
        done
    }

    /// Jobs not yet stored whose bytes are in memory (spilled at shutdown).
    pub fn unstored_in_memory(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|e| !e.stored && e.reserved)
            .map(|e| e.seq)
            .collect()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of queued jobs held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// Bytes of queued jobs in spill files.
    pub fn spilled_bytes(&self) -> usize {
        self.spilled_bytes
    }
}

/// First line of a spill file.
const SPILL_MAGIC: &str = "amphi-spill 1";

/// A spill file: a header (`amphi-spill 1`, the key, the metadata name, one per line) and
/// the object's bytes.
pub fn encode_spill(key: &str, meta: ObjectMeta, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + key.len() + 40);
    out.extend_from_slice(SPILL_MAGIC.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(key.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(meta.name().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// Why a spill file cannot be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad spill file: {0}")]
pub struct SpillError(&'static str);

/// Key, metadata and bytes of a spill file written by [`encode_spill`].
pub fn decode_spill(file: Bytes) -> Result<(String, ObjectMeta, Bytes), SpillError> {
    let mut pos = 0;
    let mut line = |what| -> Result<&str, SpillError> {
        let rest = &file[pos..];
        let end = rest
            .iter()
            .take(600)
            .position(|&b| b == b'\n')
            .ok_or(SpillError(what))?;
        pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| SpillError(what))
    };
    if line("header")? != SPILL_MAGIC {
        return Err(SpillError("header"));
    }
    let key = line("key")?.to_string();
    if !crate::storage::valid_key(&key) {
        return Err(SpillError("key"));
    }
    let meta = ObjectMeta::from_name(line("metadata")?).ok_or(SpillError("metadata"))?;
    Ok((key, meta, file.slice(pos..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..7).map(|_| b.fail().as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.failures(), 7);
        b.reset();
        assert_eq!(b.fail(), MIN_BACKOFF);
    }

    fn put(key: &str, n: usize, publish: Publish) -> Job {
        Job::Put {
            key: key.into(),
            body: Bytes::from(vec![7u8; n]),
            meta: ObjectMeta::MEDIA,
            publish,
        }
    }

    fn part(msn: u64, index: u32, t: Instant) -> Publish {
        Publish::Part {
            rendition: 0,
            msn,
            index,
            duration: 9600,
            start: None,
            arrival: t,
        }
    }

    /// Drive a lane like the driver does, with storage answering `up`.
    fn upload_all(lane: &mut Lane, budget: &MemoryBudget, now: Instant) -> Vec<u64> {
        let mut stored = Vec::new();
        for _ in 0..1000 {
            lane.publishable(now);
            budget.release(lane.take_done().memory);
            match lane.poll(now) {
                Poll::Upload(seq) => {
                    lane.stored(seq, now);
                    stored.push(seq);
                }
                _ => break,
            }
        }
        stored
    }

    #[test]
    fn in_order_publication_waits_for_storage_while_it_works() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let budget = MemoryBudget::new(1 << 20);
        let mut lane = Lane::new();
        lane.push(put("a", 10, part(0, 0, t0)), &budget);
        lane.push(put("b", 10, part(0, 1, t0)), &budget);
        assert!(lane.publishable(t0).is_empty(), "nothing stored yet");
        assert_eq!(lane.poll(t0), Poll::Upload(0));
        assert_eq!(lane.poll(t0), Poll::Upload(1), "media goes up concurrently");
        assert_eq!(lane.poll(t0), Poll::Idle);
        // 0.5 s in flight: not a stall yet.
        assert!(lane.publishable(t0 + ms(500)).is_empty());
        // Stored out of order: nothing is published before the older part is stored.
        assert_eq!(lane.stored(1, t0 + ms(10)), Transition::None);
        assert!(lane.publishable(t0 + ms(10)).is_empty());
        assert_eq!(lane.take_done(), Done::default(), "not published yet");
        assert_eq!(lane.stored(0, t0 + ms(20)), Transition::None);
        assert_eq!(lane.publishable(t0 + ms(20)), vec![0, 1]);
        budget.release(lane.take_done().memory);
        assert!(lane.is_empty());
        assert_eq!(budget.used(), 0);
        assert_eq!(lane.memory_bytes(), 0);
    }

    #[test]
    fn at_most_max_in_flight_media_uploads_and_barriers_wait_for_what_they_list() {
        let t0 = Instant::now();
        let budget = MemoryBudget::new(1 << 20);
        let mut lane = Lane::new();
        for i in 0..3 {
            lane.push(put(&format!("p{i}"), 10, part(0, i, t0)), &budget);
        }
        // A copy of the playlist listing p0..p2, then more parts.
        lane.push(
            Job::Put {
                key: "playlist.m3u8".into(),
                body: Bytes::from_static(b"#EXTM3U"),
                meta: ObjectMeta::PLAYLIST,
                publish: Publish::Nothing,
            },
            &budget,
        );
        for i in 3..20 {
            lane.push(put(&format!("p{i}"), 10, part(0, i, t0)), &budget);
        }
        let mut started = Vec::new();
        while let Poll::Upload(seq) = lane.poll(t0) {
            started.push(seq);
        }
        // The playlist (seq 3) is passed over: media behind it may go first.
        assert_eq!(started, vec![0, 1, 2, 4, 5, 6, 7, 8]);
        assert_eq!(started.len(), MAX_IN_FLIGHT);
        lane.stored(0, t0);
        lane.stored(2, t0);
        assert_eq!(
            lane.poll(t0),
            Poll::Upload(9),
            "p1 still in flight: not the playlist"
        );
        lane.stored(1, t0);
        assert_eq!(
            lane.poll(t0),
            Poll::Upload(3),
            "everything before it is stored"
        );
        assert_eq!(lane.poll(t0), Poll::Upload(10));
        // Publication stays in FIFO order.
        assert_eq!(lane.publishable(t0), vec![0, 1, 2]);
        lane.stored(4, t0);
        assert!(
            lane.publishable(t0).is_empty(),
            "the playlist is not stored yet"
        );
        lane.stored(3, t0);
        assert_eq!(lane.publishable(t0), vec![3, 4]);
    }

    /// Simulated seconds until a lane is back to zero backlog after a storage outage: a
    /// room queues 10 parts a second plus a playlist copy after every 10th; every upload
    /// takes `latency`; storage refuses everything for the first `outage`. `None`: not drained
    /// ten minutes after the outage.
    fn drain_after_outage(latency: Duration, outage: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let budget = MemoryBudget::new(usize::MAX);
        let mut lane = Lane::new();
        let mut uploads: Vec<(Instant, u64)> = Vec::new();
        let (mut now, mut next_part, mut parts, mut unstored) = (t0, t0, 0u32, 0usize);
        while now < t0 + outage + Duration::from_secs(600) {
            if now >= next_part {
                lane.push(put("p", 100, part(0, parts, t0)), &budget);
                parts += 1;
                unstored += 1;
                if parts % 10 == 0 {
                    let copy = Job::Put {
                        key: "playlist.m3u8".into(),
                        body: Bytes::from_static(b"#EXTM3U"),
                        meta: ObjectMeta::PLAYLIST,
                        publish: Publish::Nothing,
                    };
                    lane.push(copy, &budget);
                    unstored += 1;
                }
                next_part += Duration::from_millis(100);
            }
            uploads.sort();
            while uploads.first().is_some_and(|&(at, _)| at <= now) {
                let (at, seq) = uploads.remove(0);
                if at < t0 + outage {
                    lane.failed(seq, at);
                } else {
                    lane.stored(seq, at);
                    unstored -= 1;
                }
            }
            let mut wake = next_part;
            loop {
                match lane.poll(now) {
                    Poll::Upload(seq) => uploads.push((now + latency, seq)),
                    Poll::Wait(at) => {
                        wake = wake.min(at);
                        break;
                    }
                    Poll::Idle => break,
                }
            }
            uploads.sort();
            lane.publishable(now);
            lane.take_done();
            if now > t0 + outage && unstored <= 2 {
                return Some(now - (t0 + outage));
            }
            if let Some(&(at, _)) = uploads.first() {
                wake = wake.min(at);
            }
            now = wake.max(now);
        }
        None
    }

    #[test]
    fn a_two_minute_outages_backlog_drains_in_seconds_at_real_storage_latency() {
        // S3 answers a PUT in ~50 ms. One upload at a time stores 20 objects a second
        // against 11 queued: the backlog of a 120 s outage took 147 s to drain (9 s now).
        let drained = drain_after_outage(Duration::from_millis(50), Duration::from_secs(120));
        assert!(
            drained.is_some_and(|d| d < Duration::from_secs(30)),
            "backlog drained {drained:?} after the outage"
        );
        // At 100 ms one at a time never drained; concurrent media uploads take 21 s.
        let drained = drain_after_outage(Duration::from_millis(100), Duration::from_secs(120));
        assert!(
            drained.is_some_and(|d| d < Duration::from_secs(60)),
            "backlog drained {drained:?} after the outage"
        );
    }

    #[test]
    fn during_an_outage_only_the_oldest_job_probes_storage() {
        let t0 = Instant::now();
        let budget = MemoryBudget::new(1 << 20);
        let mut lane = Lane::new();
        for i in 0..5 {
            lane.push(put(&format!("p{i}"), 10, part(0, i, t0)), &budget);
        }
        assert_eq!(lane.poll(t0), Poll::Upload(0));
        assert_eq!(lane.poll(t0), Poll::Upload(1));
        assert_eq!(lane.failed(1, t0), Transition::OutageStarted);
        // p0 still in flight: no probe beside it.
        assert_eq!(lane.poll(t0 + Duration::from_secs(1)), Poll::Idle);
        assert_eq!(lane.failed(0, t0), Transition::None);
        let Poll::Wait(at) = lane.poll(t0) else {
            panic!("a retry is scheduled")
        };
        assert_eq!(lane.poll(at), Poll::Upload(0), "the oldest first");
        assert_eq!(lane.poll(at), Poll::Idle, "one probe at a time");
        assert!(matches!(lane.stored(0, at), Transition::OutageEnded { .. }));
        let mut started = Vec::new();
        while let Poll::Upload(seq) = lane.poll(at) {
            started.push(seq);
        }
        assert_eq!(started, vec![1, 2, 3, 4], "back to concurrent uploads");
    }

    #[test]
    fn an_outage_publishes_everything_and_retries_with_backoff_in_order() {
        let t0 = Instant::now();
        let budget = MemoryBudget::new(1 << 20);
        let mut lane = Lane::new();
        for i in 0..3 {
            lane.push(put(&format!("p{i}"), 100, part(0, i, t0)), &budget);
        }
        assert_eq!(lane.poll(t0), Poll::Upload(0));
        let ms = Duration::from_millis;
        assert_eq!(lane.failed(0, t0 + ms(5)), Transition::OutageStarted);
        // Degraded: the live edge moves on without storage.
        assert_eq!(lane.publishable(t0 + ms(5)), vec![0, 1, 2]);
        lane.push(put("p3", 100, part(0, 3, t0)), &budget);
        assert_eq!(
            lane.publishable(t0 + ms(6)),
            vec![3],
            "new jobs at once too"
        );
        // Retry schedule: 100, 200, 400, ... ms after each failure, always the head first.
        let mut now = t0 + ms(5);
        let mut waits = Vec::new();
        for _ in 0..6 {
            let Poll::Wait(at) = lane.poll(now) else {
                panic!("a retry is scheduled")
            };
            waits.push(at.duration_since(now).as_millis());
            now = at;
            assert_eq!(lane.poll(now), Poll::Upload(0), "the head again");
            assert_eq!(lane.failed(0, now), Transition::None);
        }
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000]);
        now += ms(2000);
        assert_eq!(lane.poll(now), Poll::Upload(0));
        let t = lane.stored(0, now);
        assert!(matches!(t, Transition::OutageEnded { retries: 7, .. }));
        assert_eq!(
            lane.take_done().memory,
            100,
            "published before: bytes go back at once"
        );
        budget.release(100);
        // Back to normal: the rest go up in order without waiting.
        let order = upload_all(&mut lane, &budget, now);
        assert_eq!(order, vec![1, 2, 3]);
        assert!(lane.is_empty());
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_live_edge_does_not_wait_for_an_outages_backlog_to_drain() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let budget = MemoryBudget::new(1 << 20);
        let mut lane = Lane::new();
        for i in 0..3 {
            lane.push(put(&format!("p{i}"), 100, part(0, i, t0)), &budget);
        }
        assert_eq!(lane.poll(t0), Poll::Upload(0));
        assert_eq!(lane.failed(0, t0), Transition::OutageStarted);
        assert_eq!(lane.publishable(t0), vec![0, 1, 2]);
        // Storage is back: the head is stored, 1 and 2 are still to go up.
        let Poll::Wait(at) = lane.poll(t0) else {
            panic!("a retry is scheduled")
        };
        assert_eq!(lane.poll(at), Poll::Upload(0));
        assert!(matches!(lane.stored(0, at), Transition::OutageEnded { .. }));
        // A new part is published at once, not after the backlog.
        lane.push(put("p3", 100, part(0, 3, t0)), &budget);
        assert_eq!(lane.publishable(at + ms(1)), vec![3]);
        // Once the backlog and the new part are stored, publication waits for storage again.
        assert_eq!(upload_all(&mut lane, &budget, at + ms(2)), vec![1, 2, 3]);
        lane.push(put("p4", 100, part(0, 4, t0)), &budget);
        assert!(lane.publishable(at + ms(3)).is_empty(), "in order again");
        assert_eq!(lane.poll(at + ms(3)), Poll::Upload(4));
        lane.stored(4, at + ms(3));
        assert_eq!(lane.publishable(at + ms(3)), vec![4]);
    }

    #[test]
    fn a_hung_upload_degrades_the_lane_after_the_stall_time() {
        let t0 = Instant::now();
        let budget = MemoryBudget::new(1 << 20);
        let mut lane = Lane::new();
        lane.push(put("a", 1, part(0, 0, t0)), &budget);
        lane.push(put("b", 1, part(0, 1, t0)), &budget);
        assert_eq!(lane.poll(t0), Poll::Upload(0));
        assert_eq!(lane.stall_deadline(), Some(t0 + STALL_AFTER));
        assert!(lane
            .publishable(t0 + STALL_AFTER - Duration::from_millis(1))
            .is_empty());
        assert_eq!(lane.publishable(t0 + STALL_AFTER), vec![0, 1]);
    }

    #[test]
    fn over_the_budget_jobs_spill_and_nothing_is_dropped() {
        let t0 = Instant::now();
        // Shared by two rooms.
        let budget = MemoryBudget::new(250);
        let (mut a, mut b) = (Lane::new(), Lane::new());
        assert_eq!(
            a.push(put("a0", 100, part(0, 0, t0)), &budget),
            Placement::Memory
        );
        assert_eq!(
            b.push(put("b0", 100, part(0, 0, t0)), &budget),
            Placement::Memory
        );
        assert_eq!(
            a.push(put("a1", 100, part(0, 1, t0)), &budget),
            Placement::Spill { seq: 1 }
        );
        assert_eq!(a.spilled(1), 0, "never counted in the budget");
        assert_eq!(a.entry(1).map(|e| e.spilled), Some(true));
        assert!(matches!(&a.entry(1).unwrap().job, Job::Put { body, .. } if body.is_empty()));
        assert_eq!(
            a.push(put("a2", 50, part(0, 2, t0)), &budget),
            Placement::Memory,
            "a smaller job still fits"
        );
        assert_eq!((a.memory_bytes(), a.spilled_bytes()), (150, 100));
        assert_eq!(budget.used(), 250);
        // The end marker holds no bytes: never spilled.
        assert_eq!(
            a.push(Job::End { spans: vec![] }, &budget),
            Placement::Memory
        );
        // Storage works: every job is stored in order, spilled or not, and memory comes back.
        let mut done_files = Vec::new();
        for _ in 0..10 {
            a.publishable(t0);
            let d = a.take_done();
            budget.release(d.memory);
            done_files.extend(d.spill_files);
            if let Poll::Upload(seq) = a.poll(t0) {
                a.stored(seq, t0);
            }
        }
        assert_eq!(done_files, vec![1], "the spill file goes once stored");
        assert!(a.is_empty());
        assert_eq!((a.memory_bytes(), a.spilled_bytes()), (0, 0));
        assert_eq!(budget.used(), 100, "room b still holds its part");
    }

    #[test]
    fn unstored_jobs_in_memory_are_listed_for_a_shutdown_spill() {
        let t0 = Instant::now();
        let budget = MemoryBudget::new(150);
        let mut lane = Lane::new();
        lane.push(put("a", 100, part(0, 0, t0)), &budget);
        let Placement::Spill { seq } = lane.push(put("b", 100, part(0, 1, t0)), &budget) else {
            panic!("over budget")
        };
        lane.spilled(seq);
        lane.push(put("c", 10, part(0, 2, t0)), &budget);
        assert_eq!(lane.unstored_in_memory(), vec![0, 2]);
        assert_eq!(
            lane.spilled(0),
            100,
            "spilling a job in memory frees its bytes"
        );
        assert_eq!((lane.memory_bytes(), lane.spilled_bytes()), (10, 200));
    }

    #[test]
    fn spill_files_round_trip_and_bad_ones_are_refused() {
        let f = encode_spill("12/opus/part3.4.m4s", ObjectMeta::INDEX, b"\x00\x01body\n");
        let (k, m, b) = decode_spill(Bytes::from(f.clone())).unwrap();
        assert_eq!(k, "12/opus/part3.4.m4s");
        assert_eq!(m.name(), ObjectMeta::INDEX.name());
        assert_eq!(&b[..], b"\x00\x01body\n");
        for bad in [
            &b""[..],
            b"amphi-spill 2\nk\nmedia\n",
            b"amphi-spill 1\n../x\nmedia\n",
            b"amphi-spill 1\nk\nsomething\n",
            b"amphi-spill 1\nk",
            &f[..5],
        ] {
            assert!(
                decode_spill(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }
}
