//! Hostile clients against a real dev mesh: slow-loris connections on every HTTP listener (the
//! geo-router, an edge, the packager's HTTP/1.1 fast path and its hyper path, the origin's
//! metrics) are cut off within the header read timeout while real requests keep being answered.

use amphi_testkit::mesh as support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

/// The servers' header read timeout (`amphi_protocol::https::HEADER_READ_TIMEOUT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a slow-loris connection is kept trying before the test calls it not cut off. Generous:
/// the test asserts that the cut happens, not how fast (the figure is printed).
const GIVE_UP: Duration = Duration::from_secs(60);

/// How a slow-loris client behaves.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request head one byte per second, never finishing it.
    Drip,
    /// Sends one complete request, reads its answer, then drips the next head (the keep-alive
    /// path: on the packager that is the hyper path behind the fast path).
    KeepAliveDrip,
}

/// The endless request head a dripping client sends.
fn endless_head() -> impl Iterator<Item = u8> {
    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        .iter()
        .copied()
        .chain(std::iter::repeat(b"X-Slow: aaaaaaaa\r\n".iter().copied()).flatten())
}

/// Run `attack` against `addr` (host:port; `path` answers 200 there); returns how long after the attack began the server
/// closed the connection, or `None` if it was still open after [`GIVE_UP`].
fn slowloris(addr: &str, path: &str, attack: Attack) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 4096];
    if let Attack::KeepAliveDrip = attack {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .unwrap();
        // Read the whole answer: its head, then Content-Length bytes of body.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .expect("Content-Length");
                if got.len() >= end + 4 + len {
                    assert!(text.starts_with("HTTP/1.1 200"), "{addr}: {text}");
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{addr}: no answer to a real request"
            );
            match s.read(&mut buf) {
                Ok(0) => panic!("{addr}: closed before answering"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("{addr}: {e}"),
            }
        }
    }
    let start = Instant::now();
    let mut head = endless_head();
    while start.elapsed() < GIVE_UP {
        if !matches!(attack, Attack::Silent) {
            let byte = [head.next().expect("endless")];
            if s.write_all(&byte).is_err() {
                return Some(start.elapsed());
            }
        }
        // The one-second read timeout paces the drip.
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {} // e.g. a 408 before the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn slowloris_is_cut_off_on_every_http_listener_while_real_requests_work() {
    let mesh = DevMesh::start(13_000, "hostile-slowloris");
    let listeners = [
        ("router", mesh.router(), "/healthz"),
        ("edge", mesh.edge(0), "/healthz"),
        ("packager", mesh.packager(), "/healthz"),
        ("origin-metrics", mesh.origin_metrics(), "/metrics"),
    ];
    let attacks = [Attack::Silent, Attack::Drip, Attack::KeepAliveDrip];
    let mut handles = Vec::new();
    for (name, base, path) in &listeners {
        let addr = base.trim_start_matches("http://").to_string();
        for attack in attacks {
            let addr = addr.clone();
            let (name, path) = (*name, *path);
            handles.push(std::thread::spawn(move || {
                (name, attack, slowloris(&addr, path, attack))
            }));
        }
    }
    // Real users keep being answered while every attack is under way.
    let attack_start = Instant::now();
    let mut answered = 0;
    while attack_start.elapsed() < HEADER_TIMEOUT + Duration::from_secs(2) {
        for (name, base, path) in &listeners {
            assert_eq!(
                get_status(&format!("{base}{path}")),
                200,
                "{name} stopped answering during the attack"
            );
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut failed = Vec::new();
    for h in handles {
        let (name, attack, cut) = h.join().expect("attack thread");
        match cut {
            Some(after) => eprintln!(
                "slowloris {name} {attack:?}: cut off after {:.1} s",
                after.as_secs_f64()
            ),
            None => failed.push(format!("{name} {attack:?}")),
        }
    }
    eprintln!("{answered} real requests answered during the attacks");
    assert!(
        failed.is_empty(),
        "still open after {GIVE_UP:?}: {failed:?}"
    );
}
