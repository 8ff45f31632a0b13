//! The room's uploader task: the driver of its upload [`Lane`].

use super::RoomHandle;
use crate::metrics::Metrics;
use crate::spill::SpillDir;
use crate::storage::{Storage, StorageError, Store};
use crate::upload::{
    Entry, Job, Lane, MemoryBudget, Placement, Poll, Publish, Transition, MAX_IN_FLIGHT,
};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What the uploaders of every room share.
pub(super) struct Uploads {
    /// The storage backend.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Memory for pending uploads, over all rooms.
    pub budget: Arc<MemoryBudget>,
    /// Where uploads beyond the budget wait.
    pub spill: Arc<SpillDir>,
}

/// How an upload attempt ended.
enum Attempt {
    Stored,
    /// Failed; retried after the backoff.
    Failed(StorageError),
    /// Cannot ever succeed (bad key, unreadable spill file): given up.
    Abandoned(StorageError),
}

/// One attempt at storing lane entry `seq` (its bytes from memory or its spill file).
fn start_put(
    up: &Uploads,
    room: RoomId,
    e: &Entry,
) -> Option<impl std::future::Future<Output = (u64, Attempt)> + Send + 'static> {
    let Job::Put {
        key, body, meta, ..
    } = &e.job
    else {
        return None;
    };
    let (store, metrics, spill) = (up.store.clone(), up.metrics.clone(), up.spill.clone());
    let (seq, key, meta, body, spilled) = (e.seq, key.clone(), *meta, body.clone(), e.spilled);
    Some(async move {
        let body = if spilled {
            match spill.read(room, seq) {
                Ok(b) => b,
                Err(e) => return (seq, Attempt::Abandoned(e.into())),
            }
        } else {
            body
        };
        let attempt = Instant::now();
        let put = store.put(&key, body, meta).await;
        metrics.observe_upload(attempt.elapsed());
        let outcome = match put {
            Ok(()) => Attempt::Stored,
            Err(e @ StorageError::BadKey(_)) => Attempt::Abandoned(e),
            Err(e) => Attempt::Failed(e),
        };
        (seq, outcome)
    })
}

/// The bytes of a queued job for publication: in memory, or read back from its spill file.
fn entry_body(up: &Uploads, room: RoomId, e: &Entry) -> Bytes {
    match &e.job {
        Job::Put { body, .. } if e.spilled => up.spill.read(room, e.seq).unwrap_or_else(|err| {
            tracing::warn!(%room, seq = e.seq, error = %err, "spill file unreadable");
            body.clone()
        }),
        Job::Put { body, .. } => body.clone(),
        Job::End { .. } => Bytes::new(),
    }
}

/// Keeps the global gauges in step with one lane.
#[derive(Default)]
struct LaneGauges {
    memory: i64,
    spilled: i64,
}

impl LaneGauges {
    fn update(&mut self, lane: &Lane, metrics: &Metrics) {
        let (m, s) = (lane.memory_bytes() as i64, lane.spilled_bytes() as i64);
        metrics
            .storage_buffered_bytes
            .fetch_add(m - self.memory, Ordering::Relaxed);
        metrics
            .storage_spilled_bytes
            .fetch_add(s - self.spilled, Ordering::Relaxed);
        (self.memory, self.spilled) = (m, s);
    }
}

/// The room's uploader: the driver of its [`Lane`]. It takes the jobs the ingest side
/// queues, publishes them in order (after storing them, or at once while storage fails),
/// spills what the memory budget cannot hold, and stores objects (several at once, as the lane
/// allows) with backoff,
/// until the room's recording is stored (or shutdown, when jobs still in memory are spilled
/// so that the next start uploads them).
pub(super) async fn uploader(
    handle: Arc<RoomHandle>,
    up: Arc<Uploads>,
    shutdown: CancellationToken,
) {
    let room = handle.room;
    let metrics = up.metrics.clone();
    let mut lane = Lane::new();
    let mut gauges = LaneGauges::default();
    let mut in_flight = tokio::task::JoinSet::new();
    // Which lane entry each upload task stores (to retry it if the task panicked).
    let mut task_seqs: Vec<(tokio::task::Id, u64)> = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut in_outage = false;
    let mut finished = false;
    loop {
        let now = Instant::now();
        let (jobs, closed) = handle.inbox.take();
        let mut spills = Vec::new();
        let queue = |lane: &mut Lane, job: Job, spills: &mut Vec<u64>| {
            if let Placement::Spill { seq } = lane.push(job, &up.budget) {
                spills.push(seq);
            }
        };
        for job in jobs {
            queue(&mut lane, job, &mut spills);
        }
        // Publication can queue more jobs (recording index, playlist copies, the recording).
        for _ in 0..8 {
            let ready = lane.publishable(now);
            if ready.is_empty() {
                break;
            }
            for seq in ready {
                let Some(e) = lane.entry(seq) else { continue };
                let body = entry_body(&up, room, e);
                for job in handle.publish_job(e.job.clone(), body, &metrics) {
                    queue(&mut lane, job, &mut spills);
                }
            }
        }
        for seq in spills {
            let written = match lane.entry(seq).map(|e| &e.job) {
                Some(Job::Put {
                    key, body, meta, ..
                }) => up.spill.write(room, seq, key, *meta, body),
                _ => continue,
            };
            match written {
                Ok(()) => up.budget.release(lane.spilled(seq)),
                Err(e) => {
                    tracing::error!(%room, error = %e, "cannot spill an upload; keeping it in memory")
                }
            }
        }
        let done = lane.take_done();
        up.budget.release(done.memory);
        for seq in done.spill_files {
            up.spill.remove(room, seq);
        }
        gauges.update(&lane, &metrics);
        if closed && lane.is_empty() && in_flight.is_empty() {
            break;
        }
        let mut wake = None;
        for _ in 0..MAX_IN_FLIGHT {
            match lane.poll(now) {
                Poll::Upload(seq) => {
                    if let Some(put) = lane.entry(seq).and_then(|e| start_put(&up, room, e)) {
                        task_seqs.push((in_flight.spawn(put).id(), seq));
                    }
                }
                Poll::Wait(at) => {
                    wake = Some(at);
                    break;
                }
                Poll::Idle => break,
            }
        }
        wake = match (wake, lane.stall_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = tokio::time::sleep_until(wake.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            Into::into,
        ));
        tokio::select! {
            Some(r) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                let (id, (seq, outcome)) = match r {
                    Ok(done) => done,
                    Err(e) => {
                        let Some(&(id, seq)) = task_seqs.iter().find(|(id, _)| *id == e.id()) else {
                            continue;
                        };
                        let failure = StorageError::Io(std::io::Error::other(e.to_string()));
                        (id, (seq, Attempt::Failed(failure)))
                    }
                };
                task_seqs.retain(|(i, _)| *i != id);
                let now = Instant::now();
                match outcome {
                    Attempt::Stored | Attempt::Abandoned(_) => {
                        if let Attempt::Abandoned(e) = &outcome {
                            tracing::error!(%room, seq, error = %e, "upload abandoned");
                        } else {
                            metrics.storage_puts.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(Job::Put { publish: Publish::RecordingStored { has_media }, .. }) =
                            lane.entry(seq).map(|e| &e.job)
                        {
                            handle.recording_stored(*has_media, &metrics);
                            finished = true;
                        }
                        if let Transition::OutageEnded { lasted, retries } = lane.stored(seq, now) {
                            in_outage = false;
                            metrics.storage_outage.fetch_sub(1, Ordering::Relaxed);
                            tracing::info!(
                                %room,
                                retries,
                                outage_ms = lasted.as_millis() as u64,
                                memory_bytes = lane.memory_bytes(),
                                spilled_bytes = lane.spilled_bytes(),
                                "storage reachable again; flushing buffered uploads"
                            );
                        }
                    }
                    Attempt::Failed(e) => {
                        metrics.storage_errors.fetch_add(1, Ordering::Relaxed);
                        metrics.storage_retry();
                        if lane.failed(seq, now) == Transition::OutageStarted {
                            in_outage = true;
                            metrics.storage_outage.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                %room,
                                error = %e,
                                memory_bytes = lane.memory_bytes(),
                                "storage put failed; buffering uploads and retrying (the live playlist goes on)"
                            );
                        }
                    }
                }
            }
            _ = handle.inbox.notify.notified() => {}
            _ = sleep => {}
            _ = shutdown.cancelled() => break,
        }
    }
    if shutdown.is_cancelled() {
        // Keep what is not stored yet for the next start.
        for seq in lane.unstored_in_memory() {
            if let Some(Job::Put {
                key, body, meta, ..
            }) = lane.entry(seq).map(|e| &e.job)
            {
                if up.spill.write(room, seq, key, *meta, body).is_ok() {
                    up.budget.release(lane.spilled(seq));
                }
            }
        }
    }
    up.budget.release(lane.memory_bytes());
    metrics
        .storage_buffered_bytes
        .fetch_sub(gauges.memory, Ordering::Relaxed);
    metrics
        .storage_spilled_bytes
        .fetch_sub(gauges.spilled, Ordering::Relaxed);
    if in_outage {
        metrics.storage_outage.fetch_sub(1, Ordering::Relaxed);
    }
    if !finished && !shutdown.is_cancelled() {
        tracing::warn!(%room, "uploader stopped before the recording was stored");
    }
}
