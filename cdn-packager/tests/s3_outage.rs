//! S3 outage (issue 11, fault 5) against a real s3s-fs: rooms stay live while s3s-fs is first
//! frozen (SIGSTOP: uploads hang) and then killed (SIGKILL: connections refused), and restarted
//! on the same directory and port. During the outage every room's live playlist keeps moving
//! and the packager serves the parts it lists; uploads beyond a small memory budget spill to
//! disk; afterwards every part and segment is in the bucket (listed through S3), in order
//! (each segment's parts numbered without a hole), the recordings are complete and the spill
//! directory is empty. A second packager started on a spill directory that a stopped one left
//! behind uploads it before anything else.
//!
//! `AMPHI_OUTAGE_ROOMS` (default 10), `AMPHI_OUTAGE_SECS` (default 20) and
//! `AMPHI_OUTAGE_BUDGET` (bytes, default 256 KiB) size the run; `bench/s3-outage.sh` runs it
//! with 50 rooms and 120 s for the figure (peak RSS and parts lost, printed as `FIGURE` lines).

use amphi_testkit::packager as common;

use amphi_packager::storage::{Storage, Store};
use amphi_packager::{Backend, Packager, PackagerOptions, StorageConfig};
use amphi_protocol::config::PackagerConfig;
use amphi_protocol::RoomId;
use common::http_get;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const KEY: &str = "amphi-outage-access";
const SECRET: &str = "amphi-outage-secret-key-1234";
const BUCKET: &str = "amphi-outage";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A real s3s-fs on loopback (stopped, killed and restarted by the test), killed on drop.
struct S3sFs {
    child: Option<Child>,
    root: PathBuf,
    port: u16,
}

impl S3sFs {
    fn start(root: PathBuf, port: u16) -> S3sFs {
        let mut s = S3sFs {
            child: None,
            root,
            port,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.root).unwrap();
        let bin = std::env::var_os("AMPHI_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(&std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/amphi/s3s/bin/s3s-fs")
            });
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} (scripts/test.sh installs it): {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill {sig}");
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A frozen process dies of SIGKILL too.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn storage(&self) -> StorageConfig {
        StorageConfig {
            backend: Backend::S3,
            bucket: BUCKET.into(),
            prefix: Some("hls".into()),
            endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
            region: None,
            path_style: true,
            access_key: Some(KEY.into()),
            secret_key: Some(SECRET.into()),
            upload_memory_budget_bytes: None,
            spill_dir: None,
        }
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.kill();
    }
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

/// The URIs of the parts (`EXT-X-PART`) and segments a media playlist lists.
fn listed(text: &str) -> (Vec<String>, Vec<String>) {
    let parts = text
        .lines()
        .filter(|l| l.starts_with("#EXT-X-PART:"))
        .filter_map(|l| l.split("URI=\"").nth(1)?.split('"').next())
        .map(str::to_string)
        .collect();
    let segs = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    (parts, segs)
}

fn packager_config(data: &Path) -> PackagerConfig {
    PackagerConfig {
        id: "outage-packager".into(),
        origins: vec![amphi_protocol::config::OriginEndpoint {
            id: "unused".into(),
            addr: ([127, 0, 0, 1], 9).into(),
            server_name: "unused".into(),
        }],
        origin_addr: None,
        origin_server_name: None,
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data.to_path_buf(),
        limits: Default::default(),
    }
}

/// Feed every room one 20 ms program frame per tick until `stop`.
fn feed(
    inputs: Vec<amphi_packager::RoomInput>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<amphi_packager::RoomInput>> {
    tokio::spawn(async move {
        let packets = amphi_testkit::synth::tone_packets(440.0, 0.3, 250).unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        // Bounded: at most an hour of program.
        for i in 0..180_000u32 {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let p = &packets[i as usize % packets.len()];
            for input in &inputs {
                input.frame(i.wrapping_mul(960), p, 1);
            }
        }
        inputs
    })
}

/// Every object in the bucket, listed through S3.
async fn bucket(storage: &StorageConfig, scratch: &Path) -> Vec<String> {
    let store = Store::open(storage, scratch).await.unwrap();
    store.list("").await.unwrap()
}

/// `(rendition, msn) -> part indices` and the segment numbers per rendition of `room`.
type Stored = (
    BTreeMap<(String, u64), BTreeSet<u32>>,
    BTreeMap<String, BTreeSet<u64>>,
);

fn stored_media(keys: &[String], room: RoomId) -> Stored {
    let mut parts: BTreeMap<(String, u64), BTreeSet<u32>> = BTreeMap::new();
    let mut segs: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let prefix = format!("{room}/");
    for k in keys.iter().filter_map(|k| k.strip_prefix(&prefix)) {
        let Some((r, file)) = k.split_once('/') else {
            continue;
        };
        if let Some(p) = file
            .strip_prefix("part")
            .and_then(|f| f.strip_suffix(".m4a"))
        {
            let (msn, i) = p.split_once('.').unwrap();
            parts
                .entry((r.to_string(), msn.parse().unwrap()))
                .or_default()
                .insert(i.parse().unwrap());
        } else if let Some(m) = file
            .strip_prefix("seg")
            .and_then(|f| f.strip_suffix(".m4a"))
        {
            segs.entry(r.to_string())
                .or_default()
                .insert(m.parse().unwrap());
        }
    }
    (parts, segs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_hls_rides_out_an_s3_outage_and_every_part_reaches_s3_after() {
    let rooms = env_or("AMPHI_OUTAGE_ROOMS", 10);
    let outage = Duration::from_secs(env_or("AMPHI_OUTAGE_SECS", 20));
    let budget = env_or("AMPHI_OUTAGE_BUDGET", 256 << 10) as usize;
    let dir = amphi_testkit::net::scratch_dir("s3-outage");
    let mut s3 = S3sFs::start(
        dir.join("s3"),
        amphi_testkit::net::free_port().unwrap().port(),
    );
    let spill_dir = dir.join("spill");
    let options = PackagerOptions {
        storage: StorageConfig {
            upload_memory_budget_bytes: Some(budget),
            spill_dir: Some(spill_dir.clone()),
            ..s3.storage()
        },
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let packager = Packager::start(
        &packager_config(&dir.join("data")),
        &options,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let addr = packager.http_addr;
    let ids: Vec<RoomId> = (0..rooms).map(|i| RoomId(0x5150_0000 + i)).collect();
    let mut inputs = Vec::new();
    for id in &ids {
        inputs.push(packager.input(*id).await.unwrap());
    }
    let stop = CancellationToken::new();
    let feeder = feed(inputs, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rss_before = vm_kib("VmRSS:");

    // The outage: frozen for the first half (uploads hang), then killed.
    let last_part = |text: &str| listed(text).0.last().cloned();
    let mut at_start = Vec::new();
    for id in &ids {
        let r = http_get(addr, &format!("/hls/{id}/opus/playlist.m3u8")).await;
        assert_eq!(r.status, 200);
        at_start.push(last_part(&r.text()));
    }
    s3.signal("-STOP");
    let began = Instant::now();
    let mut killed = false;
    let (mut polls, mut served, mut peak_spilled, mut peak_buffered) = (0u32, 0u32, 0f64, 0f64);
    let mut rss_peak = rss_before;
    while began.elapsed() < outage {
        if !killed && began.elapsed() >= outage / 2 {
            s3.kill();
            killed = true;
        }
        polls += 1;
        for id in &ids {
            for r in ["opus", "aac"] {
                let pl = http_get(addr, &format!("/hls/{id}/{r}/playlist.m3u8")).await;
                assert_eq!(pl.status, 200, "{id} {r} playlist during the outage");
                let part = last_part(&pl.text()).expect("parts listed");
                let got = http_get(addr, &format!("/hls/{id}/{r}/{part}")).await;
                assert_eq!(got.status, 200, "{id} {r} {part} during the outage");
                assert!(!got.body.is_empty());
                served += 1;
            }
        }
        let m = http_get(addr, "/metrics").await.text();
        peak_spilled = peak_spilled.max(metric(&m, "amphi_packager_storage_spilled_bytes"));
        peak_buffered = peak_buffered.max(metric(&m, "amphi_packager_storage_buffered_bytes"));
        rss_peak = rss_peak.max(vm_kib("VmRSS:"));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // The live edge moved on in every room while S3 was gone.
    for (id, before) in ids.iter().zip(&at_start) {
        let r = http_get(addr, &format!("/hls/{id}/opus/playlist.m3u8")).await;
        assert_ne!(
            &last_part(&r.text()),
            before,
            "{id}: the live edge stood still"
        );
    }
    let m = http_get(addr, "/metrics").await.text();
    assert_eq!(metric(&m, "amphi_packager_storage_outage"), rooms as f64);
    assert!(
        peak_spilled > 0.0,
        "the budget was exceeded: uploads spilled"
    );
    assert!(
        peak_buffered <= budget as f64,
        "memory held {peak_buffered} > budget {budget}"
    );
    assert!(std::fs::read_dir(&spill_dir).unwrap().next().is_some());

    // S3 is back on the same directory and port; rooms go on a while, then end.
    s3.spawn();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let inputs = feeder.await.unwrap();
    for input in &inputs {
        input.end();
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let m = loop {
        let m = http_get(addr, "/metrics").await.text();
        if metric(&m, "amphi_packager_rooms_live") == 0.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "uploads never drained:\n{m}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    rss_peak = rss_peak.max(vm_kib("VmRSS:"));
    assert_eq!(metric(&m, "amphi_packager_storage_outage"), 0.0);
    assert_eq!(metric(&m, "amphi_packager_storage_buffered_bytes"), 0.0);
    assert_eq!(metric(&m, "amphi_packager_storage_spilled_bytes"), 0.0);
    assert!(metric(&m, "amphi_packager_storage_errors_total") >= rooms as f64);
    let published = metric(&m, "amphi_packager_parts_published_total");
    let segments_published = metric(&m, "amphi_packager_segments_published_total");

    // Everything is in the bucket: every part (no hole in any segment), every segment, the
    // recordings; nothing is left in the spill directory.
    let keys = bucket(&s3.storage(), &dir).await;
    let mut opus_parts = 0usize;
    let mut opus_segments = 0usize;
    for id in &ids {
        let (parts, segs) = stored_media(&keys, *id);
        for r in ["opus", "aac"] {
            let vod = keys.iter().any(|k| k == &format!("hls/{id}/{r}/vod.m3u8"))
                || keys.iter().any(|k| k == &format!("{id}/{r}/vod.m3u8"));
            assert!(vod, "{id}: {r} recording stored");
            let seg = segs.get(r).cloned().unwrap_or_default();
            let last = *seg.iter().max().expect("segments stored");
            assert_eq!(seg.len() as u64, last + 1, "{id} {r}: a segment is missing");
            for msn in 0..=last {
                let p = parts
                    .get(&(r.to_string(), msn))
                    .cloned()
                    .unwrap_or_default();
                let n = p.len() as u32;
                assert!(n > 0, "{id} {r}: no part of segment {msn}");
                assert_eq!(p, (0..n).collect(), "{id} {r}: a part of {msn} is missing");
                if r == "opus" {
                    opus_parts += p.len();
                }
            }
            if r == "opus" {
                opus_segments += seg.len();
            }
        }
    }
    let lost = published as i64 - opus_parts as i64;
    println!(
        "FIGURE s3-outage rooms={rooms} outage_s={} budget_bytes={budget} parts_published={published} parts_stored={opus_parts} parts_lost={lost} segments_published={segments_published} segments_stored={opus_segments} peak_memory_buffered_bytes={peak_buffered} peak_spilled_bytes={peak_spilled} rss_before_kib={rss_before} rss_peak_kib={rss_peak} vm_hwm_kib={} playlist_and_part_fetches_during_outage={served} polls={polls}",
        outage.as_secs(),
        vm_kib("VmHWM:"),
    );
    assert_eq!(lost, 0, "parts lost");
    assert_eq!(opus_segments as f64, segments_published);
    shutdown.cancel();
    packager.stopped().await.unwrap();
    let leftovers: Vec<_> = walk(&spill_dir);
    assert!(leftovers.is_empty(), "spill files left: {leftovers:?}");
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packager_stopped_during_an_outage_leaves_a_spill_dir_the_next_one_uploads() {
    let dir = amphi_testkit::net::scratch_dir("s3-spill-resume");
    let mut s3 = S3sFs::start(
        dir.join("s3"),
        amphi_testkit::net::free_port().unwrap().port(),
    );
    let spill_dir = dir.join("spill");
    let options = PackagerOptions {
        storage: StorageConfig {
            upload_memory_budget_bytes: Some(16 << 10),
            spill_dir: Some(spill_dir.clone()),
            ..s3.storage()
        },
        ..Default::default()
    };
    let room = RoomId(0x5151_0001);
    // First run: S3 is killed after 2 s, the room goes on 8 s, then the packager stops.
    let shutdown = CancellationToken::new();
    let packager = Packager::start(
        &packager_config(&dir.join("data")),
        &options,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let feeder = feed(vec![packager.input(room).await.unwrap()], stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3.kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let addr = packager.http_addr;
    let pl = http_get(addr, &format!("/hls/{room}/opus/playlist.m3u8")).await;
    let (parts, segs) = listed(&pl.text());
    stop.cancel();
    drop(feeder.await.unwrap());
    let published = metric(
        &http_get(addr, "/metrics").await.text(),
        "amphi_packager_parts_published_total",
    );
    shutdown.cancel();
    packager.stopped().await.unwrap();
    let left = walk(&spill_dir);
    assert!(!left.is_empty(), "nothing spilled");

    // Second run: S3 is back; the new packager uploads what the first one left, then the room
    // reopens after it (numbering goes on after the stored segments).
    s3.spawn();
    let shutdown = CancellationToken::new();
    let packager = Packager::start(
        &packager_config(&dir.join("data")),
        &options,
        shutdown.clone(),
    )
    .await
    .unwrap();
    let input = tokio::time::timeout(Duration::from_secs(60), packager.input(room))
        .await
        .expect("the room opens once its spill files are stored")
        .unwrap();
    let m = packager.metrics_text();
    assert_eq!(
        metric(&m, "amphi_packager_storage_spill_recovered_total"),
        left.len() as f64
    );
    let keys = bucket(&s3.storage(), &dir).await;
    for uri in parts.iter().chain(&segs) {
        assert!(
            keys.contains(&format!("{room}/opus/{uri}")),
            "{uri} was listed before the stop and is not in the bucket"
        );
    }
    let (stored_parts, _) = stored_media(&keys, room);
    let opus_parts: usize = stored_parts
        .iter()
        .filter(|((r, _), _)| r == "opus")
        .map(|(_, p)| p.len())
        .sum();
    assert_eq!(
        opus_parts as f64, published,
        "every published part is stored"
    );
    assert!(walk(&spill_dir).is_empty(), "spill files left");
    drop(input);
    shutdown.cancel();
    packager.stopped().await.unwrap();
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without static keys in the config the S3 backend takes its credentials from the AWS default
/// chain (here its first link, the environment; on EC2 the instance profile): a put and a get
/// against a real s3s-fs that refuses unsigned or wrongly signed requests.
#[tokio::test]
async fn the_s3_backend_signs_with_the_default_credential_chain_without_static_keys() {
    let dir = amphi_testkit::net::scratch_dir("s3-chain");
    let s3 = S3sFs::start(
        dir.join("s3"),
        amphi_testkit::net::free_port().unwrap().port(),
    );
    // Only this test reads these variables (the others sign with static keys, which win).
    std::env::set_var("AWS_ACCESS_KEY_ID", KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
    let config = StorageConfig {
        bucket: "amphi-chain".into(),
        access_key: None,
        secret_key: None,
        ..s3.storage()
    };
    let store = Store::open(&config, &dir).await.unwrap();
    store
        .put(
            "room/opus/part1.0.m4s",
            bytes::Bytes::from_static(b"part"),
            amphi_packager::storage::ObjectMeta::MEDIA,
        )
        .await
        .unwrap();
    assert_eq!(
        store.get("room/opus/part1.0.m4s").await.unwrap().unwrap(),
        &b"part"[..]
    );
    let half = StorageConfig {
        secret_key: None,
        ..s3.storage()
    };
    assert!(Store::open(&half, &dir).await.is_err());
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
}
