//! The spill directory (driver side of [`crate::upload`]): uploads that do not fit in the
//! memory budget wait in files `{spill_dir}/{generation}/{room}/{seq}` (format:
//! [`encode_spill`]), one generation per packager start (its start time in Unix
//! milliseconds, zero-padded so that names sort by age). At start, files of earlier
//! generations (left by a packager that stopped or crashed during a storage outage) are
//! uploaded in order, per room, before that room is opened again.

use crate::metrics::Metrics;
use crate::storage::{ObjectMeta, Storage, StorageError, Store};
use crate::upload::{decode_spill, encode_spill, Backoff};
use amphi_protocol::RoomId;
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// This packager's generation directory inside the spill directory.
#[derive(Debug)]
pub struct SpillDir {
    root: PathBuf,
    generation: String,
}

impl SpillDir {
    /// A new generation under `root` (created on first spill).
    pub fn new(root: PathBuf) -> Self {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        SpillDir {
            root,
            generation: format!("{ms:016}"),
        }
    }

    /// The spill directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, room: RoomId, seq: u64) -> PathBuf {
        self.root
            .join(&self.generation)
            .join(room.to_string())
            .join(format!("{seq:020}"))
    }

    /// Write job `seq` of `room` (small files; written synchronously by the room's uploader).
    pub fn write(
        &self,
        room: RoomId,
        seq: u64,
        key: &str,
        meta: ObjectMeta,
        body: &[u8],
    ) -> io::Result<()> {
        let path = self.path(room, seq);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, encode_spill(key, meta, body))
    }

    /// The bytes of job `seq` of `room`.
    pub fn read(&self, room: RoomId, seq: u64) -> io::Result<Bytes> {
        let file = Bytes::from(std::fs::read(self.path(room, seq))?);
        decode_spill(file)
            .map(|(_, _, body)| body)
            .map_err(io::Error::other)
    }

    /// Remove job `seq`'s file of `room`.
    pub fn remove(&self, room: RoomId, seq: u64) {
        let _ = std::fs::remove_file(self.path(room, seq));
    }

    /// Spill files of earlier generations, per room, oldest first.
    pub fn leftovers(&self) -> io::Result<BTreeMap<RoomId, Vec<PathBuf>>> {
        let mut out: BTreeMap<RoomId, Vec<PathBuf>> = BTreeMap::new();
        let gens = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut gens: Vec<PathBuf> = gens
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str() != Some(&self.generation))
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        gens.sort();
        for g in gens {
            for room_dir in std::fs::read_dir(&g)?.filter_map(Result::ok) {
                let Some(room) = room_dir
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<RoomId>().ok())
                else {
                    continue;
                };
                let mut files: Vec<PathBuf> = std::fs::read_dir(room_dir.path())?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect();
                files.sort();
                out.entry(room).or_default().extend(files);
            }
        }
        Ok(out)
    }

    /// Remove empty directories of earlier generations.
    fn prune(&self) {
        let Ok(gens) = std::fs::read_dir(&self.root) else {
            return;
        };
        for g in gens.filter_map(Result::ok) {
            if g.file_name().to_str() == Some(&self.generation) {
                continue;
            }
            if let Ok(rooms) = std::fs::read_dir(g.path()) {
                for r in rooms.filter_map(Result::ok) {
                    let _ = std::fs::remove_dir(r.path());
                }
            }
            let _ = std::fs::remove_dir(g.path());
        }
    }
}

/// Rooms whose earlier spill files are still being uploaded; a room is opened only after.
#[derive(Debug, Default)]
pub struct Recovery {
    rooms: Mutex<HashSet<RoomId>>,
    done: Notify,
}

impl Recovery {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<RoomId>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until `room` has nothing left from earlier generations; `false` on shutdown.
    pub async fn wait(&self, room: RoomId, shutdown: &CancellationToken) -> bool {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().contains(&room) {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }
}

/// Upload what earlier generations left in `spill`, one task per room, each file in order
/// (retried with backoff until stored or `shutdown`), deleting each once stored. Returns the
/// set of rooms still recovering (rooms leave it as they finish).
pub fn recover(
    spill: Arc<SpillDir>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Arc<Recovery> {
    let recovery = Arc::new(Recovery::default());
    let leftovers = match spill.leftovers() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dir = %spill.root().display(), error = %e, "cannot read the spill directory");
            return recovery;
        }
    };
    if leftovers.is_empty() {
        return recovery;
    }
    let files: usize = leftovers.values().map(Vec::len).sum();
    tracing::info!(
        rooms = leftovers.len(),
        files,
        dir = %spill.root().display(),
        "uploading spill files left by an earlier run"
    );
    recovery.lock().extend(leftovers.keys().copied());
    for (room, files) in leftovers {
        let (recovery, spill, store, metrics, shutdown) = (
            recovery.clone(),
            spill.clone(),
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            let mut left = 0usize;
            for f in &files {
                if shutdown.is_cancelled() {
                    left += 1;
                    continue;
                }
                match upload_file(f, &store, &metrics, &shutdown).await {
                    Ok(()) => {
                        let _ = tokio::fs::remove_file(f).await;
                        metrics.storage_spill_recovered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        left += 1;
                        tracing::warn!(%room, file = %f.display(), error = %e, "spill file not uploaded");
                    }
                }
            }
            tracing::info!(%room, files = files.len(), left, "earlier spill files handled");
            recovery.lock().remove(&room);
            recovery.done.notify_waiters();
            if recovery.lock().is_empty() {
                spill.prune();
            }
        });
    }
    recovery
}

/// Upload one spill file, retrying until stored; `Err` on shutdown or an unreadable file.
async fn upload_file(
    path: &Path,
    store: &Store,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), StorageError> {
    let file = Bytes::from(tokio::fs::read(path).await?);
    let (key, meta, body) = decode_spill(file).map_err(|e| StorageError::Config(e.to_string()))?;
    let mut backoff = Backoff::default();
    loop {
        match store.put(&key, body.clone(), meta).await {
            Ok(()) => {
                metrics.storage_puts.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e @ StorageError::BadKey(_)) => return Err(e),
            Err(e) => {
                metrics.storage_errors.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.fail()) => metrics.storage_retry(),
                    _ = shutdown.cancelled() => return Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leftovers_of_earlier_generations_are_uploaded_in_order_then_removed() {
        let base = std::env::temp_dir().join(format!("amphi-spill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let old = SpillDir {
            root: base.join("spill"),
            generation: format!("{:016}", 1),
        };
        for seq in [2u64, 0, 1] {
            old.write(
                RoomId(7),
                seq,
                &format!("7/opus/part0.{seq}.m4s"),
                ObjectMeta::MEDIA,
                format!("body{seq}").as_bytes(),
            )
            .unwrap();
        }
        // The playlist copy was spilled after the part it lists: written last.
        old.write(
            RoomId(7),
            3,
            "7/opus/playlist.m3u8",
            ObjectMeta::PLAYLIST,
            b"v2",
        )
        .unwrap();
        let current = Arc::new(SpillDir::new(base.join("spill")));
        current
            .write(RoomId(8), 0, "8/x.m4s", ObjectMeta::MEDIA, b"now")
            .unwrap();
        let left = current.leftovers().unwrap();
        assert_eq!(left.len(), 1, "this generation's files are not leftovers");
        assert_eq!(left[&RoomId(7)].len(), 4);

        let store = Arc::new(Store::Fs(crate::storage::FsStore::new(base.join("hls"))));
        let metrics = Arc::new(Metrics::default());
        let tasks = tokio_util::task::TaskTracker::new();
        let shutdown = CancellationToken::new();
        let rec = recover(
            current.clone(),
            store.clone(),
            metrics.clone(),
            &tasks,
            shutdown.clone(),
        );
        assert!(tokio::time::timeout(
            std::time::Duration::from_secs(10),
            rec.wait(RoomId(7), &shutdown)
        )
        .await
        .unwrap());
        assert!(
            rec.wait(RoomId(9), &shutdown).await,
            "rooms without leftovers do not wait"
        );
        for seq in 0..3 {
            let got = store.get(&format!("7/opus/part0.{seq}.m4s")).await.unwrap();
            assert_eq!(got.unwrap(), format!("body{seq}").as_bytes());
        }
        assert_eq!(
            store.get("7/opus/playlist.m3u8").await.unwrap().unwrap(),
            &b"v2"[..]
        );
        assert_eq!(metrics.storage_spill_recovered.load(Ordering::Relaxed), 4);
        tasks.close();
        tasks.wait().await;
        assert!(current.leftovers().unwrap().is_empty());
        assert!(
            !base.join("spill").join(format!("{:016}", 1)).exists(),
            "empty generations are pruned"
        );
        assert_eq!(current.read(RoomId(8), 0).unwrap(), &b"now"[..]);
        let _ = std::fs::remove_dir_all(&base);
    }
}
