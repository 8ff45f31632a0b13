//! Ordered uploads to storage: each room has one FIFO of jobs (parts, segments, playlists, the
//! end of the room) drained by one task, so objects reach storage in order and a playlist is
//! only updated once the objects it names are stored. While storage is unreachable the job at
//! the head is retried with exponential backoff and the rest wait in memory (bounded: past
//! the bound new parts are skipped, never segments).

use crate::metrics::Metrics;
use crate::playlist::SpeakerSpan;
use crate::segmenter::SegmentStart;
use crate::storage::ObjectMeta;
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// First retry delay.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

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
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Bytes queued or being uploaded.
    bytes: usize,
    closed: bool,
    skipping: bool,
}

/// A room's FIFO of uploads.
#[derive(Debug)]
pub struct UploadQueue {
    state: Mutex<QueueState>,
    notify: Notify,
    max_bytes: usize,
    metrics: Arc<Metrics>,
    /// The room whose uploads these are (for logs).
    room: RoomId,
}

impl UploadQueue {
    /// An empty queue of `room`'s uploads holding at most `max_bytes` of parts.
    pub fn new(room: RoomId, max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        UploadQueue {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            max_bytes,
            metrics,
            room,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job. Parts are skipped (returns false) while the buffer is over its bound.
    pub fn push(&self, job: Job) -> bool {
        let n = job.bytes();
        {
            let mut st = self.lock();
            if st.closed {
                return false;
            }
            let is_part = matches!(
                &job,
                Job::Put {
                    publish: Publish::Part { .. },
                    ..
                }
            );
            if is_part && st.bytes + n > self.max_bytes {
                if !st.skipping {
                    tracing::warn!(
                        room = %self.room,
                        buffered = st.bytes,
                        bound = self.max_bytes,
                        "upload buffer full: skipping parts until storage catches up (segments are kept)"
                    );
                }
                st.skipping = true;
                self.metrics
                    .storage_parts_skipped
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
            st.skipping = false;
            st.bytes += n;
            st.jobs.push_back(job);
        }
        self.metrics
            .storage_buffered_bytes
            .fetch_add(n as i64, Ordering::Relaxed);
        self.notify.notify_one();
        true
    }

    /// The next job (waits); `None` once closed and drained.
    pub async fn next(&self) -> Option<Job> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.lock();
                if let Some(j) = st.jobs.pop_front() {
                    return Some(j);
                }
                if st.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// A job taken with [`UploadQueue::next`] is done (stored or abandoned).
    pub fn done(&self, job: &Job) {
        let n = job.bytes();
        let mut st = self.lock();
        st.bytes = st.bytes.saturating_sub(n);
        drop(st);
        self.metrics
            .storage_buffered_bytes
            .fetch_sub(n as i64, Ordering::Relaxed);
    }

    /// No more jobs will be pushed (after the `End` job).
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Bytes queued or in flight.
    pub fn buffered(&self) -> usize {
        self.lock().bytes
    }
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

    fn part(n: usize) -> Job {
        Job::Put {
            key: "k".into(),
            body: Bytes::from(vec![0u8; n]),
            meta: ObjectMeta::MEDIA,
            publish: Publish::Part {
                rendition: 0,
                msn: 0,
                index: 0,
                duration: 9600,
                start: None,
                arrival: Instant::now(),
            },
        }
    }

    #[tokio::test]
    async fn bounded_for_parts_never_for_segments_and_fifo() {
        let m = Arc::new(Metrics::default());
        let q = UploadQueue::new(RoomId(1), 100, m.clone());
        assert!(q.push(part(60)));
        assert!(!q.push(part(60)), "over the bound: part skipped");
        let seg = Job::Put {
            key: "s".into(),
            body: Bytes::from(vec![0u8; 500]),
            meta: ObjectMeta::MEDIA,
            publish: Publish::Nothing,
        };
        assert!(q.push(seg), "non-parts are always kept");
        assert_eq!(q.buffered(), 560);
        assert_eq!(m.storage_parts_skipped.load(Ordering::Relaxed), 1);
        let a = q.next().await.unwrap();
        assert!(matches!(&a, Job::Put { key, .. } if key == "k"));
        q.done(&a);
        let b = q.next().await.unwrap();
        assert!(matches!(&b, Job::Put { key, .. } if key == "s"));
        q.done(&b);
        assert_eq!(q.buffered(), 0);
        assert_eq!(m.storage_buffered_bytes.load(Ordering::Relaxed), 0);
        q.close();
        assert!(q.next().await.is_none());
    }
}
