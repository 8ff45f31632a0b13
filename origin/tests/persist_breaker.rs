//! The origin's room store against a Redis that stops answering (a real `redis-server` behind
//! a loopback proxy that can freeze, as a SIGSTOPped Redis does: connections stay open, nothing
//! comes back). `scripts/test.sh` starts the Redis and sets `AMPHI_TEST_REDIS_URL`.
//!
//! After one load times out, the next loads of the join path do not go to Redis at all (the room
//! runs unverified at once instead of waiting for a timeout per room); a write or a background
//! load (the reverification, which always asks) that reaches Redis again closes the breaker.

use amphi_origin::persist::{PersistError, RoomChanges, RoomStore};
use amphi_protocol::RoomId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Database of this test (each test of the run owns one).
const DB: u8 = 13;

/// A TCP proxy to Redis that can freeze: while frozen, what clients send is held (and
/// counted), so Redis answers nothing.
struct FreezingProxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    /// Bytes clients sent while frozen.
    sent_while_frozen: Arc<AtomicU64>,
}

impl FreezingProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let sent_while_frozen = Arc::new(AtomicU64::new(0));
        let (f, n) = (frozen.clone(), sent_while_frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (f, n) = (f.clone(), n.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(len @ 1..) = cr.read(&mut buf).await {
                        if f.load(Ordering::SeqCst) {
                            n.fetch_add(len as u64, Ordering::SeqCst);
                        }
                        for _ in 0..600 {
                            if !f.load(Ordering::SeqCst) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        if sw.write_all(&buf[..len]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
            }
        });
        FreezingProxy {
            port,
            frozen,
            sent_while_frozen,
        }
    }
}

/// A room store (keys under `prefix`) reaching the run's Redis through a [`FreezingProxy`].
async fn behind_a_proxy(prefix: &str) -> (FreezingProxy, RoomStore) {
    let base = std::env::var("AMPHI_TEST_REDIS_URL")
        .expect("AMPHI_TEST_REDIS_URL is not set: run scripts/test.sh (it starts redis-server)");
    let upstream = base
        .trim_end_matches('/')
        .trim_start_matches("redis://")
        .to_string();
    let proxy = FreezingProxy::start(upstream).await;
    let store = RoomStore::connect(&format!("redis://127.0.0.1:{}/{DB}", proxy.port), prefix)
        .await
        .unwrap();
    (proxy, store)
}

#[tokio::test]
async fn after_a_timed_out_load_rooms_skip_a_frozen_redis_until_a_write_reaches_it() {
    let (proxy, store) = behind_a_proxy("breaker-test:").await;
    assert!(store.load(RoomId(1)).await.unwrap().is_none());

    proxy.frozen.store(true, Ordering::SeqCst);
    let first = store.load_unless_failing(RoomId(2)).await;
    assert!(
        matches!(first, Err(PersistError::Redis(_))),
        "the first load waits for its timeout: {first:?}"
    );
    let asked = proxy.sent_while_frozen.load(Ordering::SeqCst);
    assert!(asked > 0, "the first load went to Redis");
    for room in 3..13 {
        let skipped = store.load_unless_failing(RoomId(room)).await;
        assert!(
            matches!(skipped, Err(PersistError::Skipped)),
            "room {room}: {skipped:?}"
        );
    }
    assert_eq!(
        proxy.sent_while_frozen.load(Ordering::SeqCst),
        asked,
        "later loads did not ask the frozen Redis"
    );

    // Redis answers again; the persister's next write closes the breaker.
    proxy.frozen.store(false, Ordering::SeqCst);
    let changes = RoomChanges {
        reset: true,
        ..RoomChanges::default()
    };
    let mut written = Err(PersistError::Skipped);
    for _ in 0..10 {
        written = store.store(RoomId(20), &changes).await;
        if written.is_ok() {
            break;
        }
    }
    written.unwrap();
    assert!(store
        .load_unless_failing(RoomId(21))
        .await
        .unwrap()
        .is_none());

    // Again, and this time nothing is written: the background reverification's load probes
    // Redis while the breaker is open, and its answer closes it.
    proxy.frozen.store(true, Ordering::SeqCst);
    assert!(store.load_unless_failing(RoomId(22)).await.is_err());
    proxy.frozen.store(false, Ordering::SeqCst);
    assert!(matches!(
        store.load_unless_failing(RoomId(23)).await,
        Err(PersistError::Skipped)
    ));
    let mut probed = Err(PersistError::Skipped);
    for _ in 0..10 {
        probed = store.load(RoomId(24)).await;
        if probed.is_ok() {
            break;
        }
    }
    assert!(probed.unwrap().is_none());
    assert!(store
        .load_unless_failing(RoomId(25))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn the_writer_stops_a_pass_at_the_first_failure_and_writes_everything_once_redis_answers() {
    use amphi_origin::persist::Persister;
    let (proxy, store) = behind_a_proxy("writer-test:").await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let persister = Persister::start(store.clone(), shutdown.clone());
    let rooms: Vec<RoomId> = (100..105).map(RoomId).collect();
    let ban = |user: &str| RoomChanges {
        reset: true,
        banned: Some(vec![user.to_string()]),
        ..RoomChanges::default()
    };

    proxy.frozen.store(true, Ordering::SeqCst);
    for (i, room) in rooms.iter().enumerate() {
        persister.save_changes(*room, ban(&format!("banned-{i}")));
    }
    // Bounded: one write times out after the store's own timeout.
    for _ in 0..300 {
        if persister.failed.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        persister.failed.load(Ordering::SeqCst),
        1,
        "a frozen Redis costs one timed-out write per pass, not one per room"
    );
    assert_eq!(persister.backlog(), rooms.len(), "nothing is dropped");

    proxy.frozen.store(false, Ordering::SeqCst);
    for _ in 0..300 {
        if persister.backlog() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        persister.backlog(),
        0,
        "everything is written once Redis answers"
    );
    for (i, room) in rooms.iter().enumerate() {
        let stored = store.load(*room).await.unwrap().expect("stored");
        assert_eq!(stored.state.banned, vec![format!("banned-{i}")]);
    }
    shutdown.cancel();
}
