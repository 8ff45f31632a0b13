//! The kernel's floor for answering held HTTP requests, measured beside `amphi-tools loadgen hls`.
//!
//! The same players (the load generator's HTTP client, kernel receive timestamps) hold one
//! request each against a minimal blocking server. Every part duration the server renders one
//! response of the packager's size and does nothing but `write` it to every waiting socket in
//! turn, the least work any origin can do to answer held requests over TCP. Its delivery delays
//! and its CPU per write are the floor the packager's figures are compared to, in the same run.

use crate::loadgen_webrtc::thread_cpu_us;
use anyhow::{Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The floor server: answers every held request once per `period` with the same response.
pub struct FloorServer {
    /// Where players connect.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Count writes and CPU only while set.
    pub measuring: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<WriteCost>>,
}

/// CPU the server thread spent while `measuring` was set.
#[derive(Debug, Clone, Copy)]
pub struct WriteCost {
    /// Responses written while measuring.
    pub writes: u64,
    /// Thread CPU time (user + system) of the write passes, µs.
    pub cpu_us: f64,
}

/// A waiting player's socket.
struct Player {
    stream: TcpStream,
    /// Bytes of the request being read (a request ends with an empty line).
    tail: [u8; 4],
    waiting: bool,
}

impl FloorServer {
    /// Start serving on 127.0.0.1 (an ephemeral port): responses of `response_len` bytes, one
    /// pass every `period`, the publication time in `published_header`.
    pub fn start(
        response_len: usize,
        period: Duration,
        published_header: &'static str,
    ) -> Result<FloorServer> {
        Self::spawn("tcp-floor", move |listener, stop, measuring| {
            serve(
                listener,
                response_len,
                period,
                published_header,
                stop,
                measuring,
            )
        })
    }

    /// The kernel's floor for push listeners (`amphi-tools loadgen push`): every connection is
    /// answered `101` at once, then every `period` one thread writes the same `message` bytes to
    /// every socket in turn, the least work any server can do to push one room's messages over
    /// TCP.
    pub fn start_push(message: Vec<u8>, period: Duration) -> Result<FloorServer> {
        Self::spawn("push-floor", move |listener, stop, measuring| {
            push_passes(listener, &message, period, stop, measuring)
        })
    }

    /// Listen on 127.0.0.1 (an ephemeral port) and run `passes` on its own thread `name`.
    fn spawn(
        name: &str,
        passes: impl FnOnce(TcpListener, &AtomicBool, &AtomicBool) -> Result<WriteCost> + Send + 'static,
    ) -> Result<FloorServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("floor server bind")?;
        // std listens with a backlog of 128; players connect in bursts of hundreds.
        // SAFETY: listen(2) on the listener's own open socket; it only raises the backlog.
        if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } != 0 {
            return Err(std::io::Error::last_os_error()).context("floor server listen");
        }
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let flags = (stop.clone(), measuring.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || passes(listener, &flags.0, &flags.1))?;
        Ok(FloorServer {
            addr,
            stop,
            measuring,
            thread,
        })
    }

    /// Stop serving; the CPU cost of all write passes.
    pub fn stop(self) -> Result<WriteCost> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("floor server thread panicked"))?
    }
}

fn serve(
    listener: TcpListener,
    response_len: usize,
    period: Duration,
    published_header: &str,
    stop: &AtomicBool,
    measuring: &AtomicBool,
) -> Result<WriteCost> {
    let mut players: Vec<Player> = Vec::new();
    let mut scratch = [0u8; 4096];
    let mut response = Vec::with_capacity(response_len + 256);
    let mut cost = WriteCost {
        writes: 0,
        cpu_us: 0.0,
    };
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Relaxed) {
        // Between passes: accept players and read their requests (nonblocking polls: cheap
        // to write, not a floor for reading, so only the write passes are timed).
        while let Ok((stream, _)) = listener.accept() {
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            players.push(Player {
                stream,
                tail: [0; 4],
                waiting: false,
            });
        }
        players.retain_mut(|p| read_requests(p, &mut scratch));
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            continue;
        }
        next += period;
        render(&mut response, response_len, published_header);
        let before = thread_cpu_us();
        let mut writes = 0;
        for p in players.iter_mut().filter(|p| p.waiting) {
            if write_all(&mut p.stream, &response).is_ok() {
                writes += 1;
            }
            p.waiting = false;
        }
        if measuring.load(Ordering::Relaxed) {
            cost.writes += writes;
            cost.cpu_us += thread_cpu_us() - before;
        }
    }
    Ok(cost)
}

/// Read whatever the player sent; `false` once it hung up.
fn read_requests(p: &mut Player, scratch: &mut [u8]) -> bool {
    loop {
        match p.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => {
                for &b in &scratch[..n] {
                    p.tail = [p.tail[1], p.tail[2], p.tail[3], b];
                    if &p.tail == b"\r\n\r\n" {
                        p.waiting = true;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// A playlist-shaped response of exactly `len` bytes (when `len` leaves room for the head),
/// published now.
fn render(out: &mut Vec<u8>, len: usize, published_header: &str) {
    let published = crate::loadgen_hls::unix_us();
    let head = |body: usize| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.apple.mpegurl\r\n\
             cache-control: max-age=1\r\n{published_header}: {published}\r\ncontent-length: {body}\r\n\r\n"
        )
    };
    // The head's length depends on the body's digits: settle it (two rounds always do).
    let mut body = len.saturating_sub(head(0).len());
    for _ in 0..2 {
        body = len.saturating_sub(head(body).len());
    }
    let body = body.max(8);
    out.clear();
    out.extend_from_slice(head(body).as_bytes());
    out.extend_from_slice(b"#EXTM3U\n");
    out.resize(out.len() + body - 8, b'#');
}

/// How long after its last new connection the push floor still reads its sockets.
const READ_WHILE_ACCEPTING: Duration = Duration::from_secs(2);

fn push_passes(
    listener: TcpListener,
    message: &[u8],
    period: Duration,
    stop: &AtomicBool,
    measuring: &AtomicBool,
) -> Result<WriteCost> {
    let mut socks: Vec<TcpStream> = Vec::new();
    let mut scratch = [0u8; 4096];
    let mut cost = WriteCost {
        writes: 0,
        cpu_us: 0.0,
    };
    let mut next = Instant::now() + period;
    let mut last_accept = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        while let Ok((mut stream, _)) = listener.accept() {
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            if write_all(&mut stream, b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_ok() {
                socks.push(stream);
            }
            last_accept = Instant::now();
        }
        // Whatever the listeners sent (their upgrade request, right after connecting) is read
        // and dropped; once they are all in, the sockets are only written (polling thousands of
        // idle sockets every few ms would load the box the figures share).
        if last_accept.elapsed() <= READ_WHILE_ACCEPTING {
            socks.retain_mut(|s| loop {
                match s.read(&mut scratch) {
                    Ok(0) => return false,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            });
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            continue;
        }
        next += period;
        let before = thread_cpu_us();
        let mut writes = 0;
        for s in socks.iter_mut() {
            if write_all(s, message).is_ok() {
                writes += 1;
            }
        }
        if measuring.load(Ordering::Relaxed) {
            cost.writes += writes;
            cost.cpu_us += thread_cpu_us() - before;
        }
    }
    Ok(cost)
}

/// Write all of `buf` to a nonblocking socket (the response fits its send buffer, so this
/// loops only if the player stopped reading).
fn write_all(stream: &mut TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::yield_now()
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_have_the_requested_size_and_a_parseable_head() {
        let mut out = Vec::new();
        render(&mut out, 1500, "x-amphi-published-us");
        assert_eq!(out.len(), 1500);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        assert!(body.starts_with("#EXTM3U\n"));
        assert!(head.contains("x-amphi-published-us: "));
    }

    #[test]
    fn a_held_request_is_answered_on_the_next_pass() {
        let server = FloorServer::start(800, Duration::from_millis(50), "x-pub").unwrap();
        server.measuring.store(true, Ordering::Relaxed);
        let mut c = TcpStream::connect(server.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            c.write_all(b"GET /floor HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = vec![0u8; 800];
            c.read_exact(&mut buf).unwrap();
            got.push(buf);
        }
        let cost = server.stop().unwrap();
        assert_eq!(cost.writes, 2);
        assert!(got.iter().all(|r| r.starts_with(b"HTTP/1.1 200 OK\r\n")));
    }
}
