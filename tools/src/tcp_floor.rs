//! The kernel's floor for answering held HTTP requests, measured beside `amphi-tools loadgen hls`.
//!
//! The same players (the load generator's HTTP client, kernel receive timestamps) hold one
//! request each against a minimal blocking server. Every part duration the server renders one
//! response of the packager's size and does nothing but `write` it to every waiting socket in
//! turn, the least work any origin can do to answer held requests over TCP. Its delivery delays
//! and its CPU per write are the floor the packager's figures are compared to, in the same run.
//!
//! Between passes it reads requests the way a server does ([`FloorReads::Epoll`]): every socket
//! in one epoll set with the registration tokio makes, each request read once when it arrives,
//! so the floor makes the packager's syscalls with none of its work. The older floor
//! ([`FloorReads::Polled`]) swept every socket with a nonblocking read every few milliseconds,
//! about 40 reads per socket per pass: far more syscalls than any server makes, and they kept
//! every socket's kernel state in the CPU's caches for the next pass.

use crate::loadgen_webrtc::thread_cpu_us;
use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
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

/// How the floor server reads its players' requests between write passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorReads {
    /// Each socket registered once in one epoll set (read and write interest, edge-triggered,
    /// as tokio registers the packager's sockets) and read when its request arrives.
    Epoll,
    /// Every socket read (nonblocking) every few milliseconds, whether it sent anything or not.
    Polled,
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
    /// Requests are read as `reads` says.
    /// With `cpu`, its thread runs on that CPU only.
    pub fn start(
        response_len: usize,
        period: Duration,
        published_header: &'static str,
        reads: FloorReads,
        cpu: Option<usize>,
    ) -> Result<FloorServer> {
        Self::spawn("tcp-floor", move |listener, stop, measuring| {
            if let Some(cpu) = cpu {
                pin_thread(0, cpu)?;
            }
            let pass = Pass {
                response: Vec::with_capacity(response_len + 256),
                response_len,
                published_header,
                measuring,
                cost: WriteCost {
                    writes: 0,
                    cpu_us: 0.0,
                },
            };
            match reads {
                FloorReads::Epoll => serve_epoll(listener, period, stop, pass),
                FloorReads::Polled => serve_polled(listener, period, stop, pass),
            }
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

/// Run the thread `tid` (0: the calling thread) on CPU `cpu` only.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity(2) only read
    // and write that local set.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// Run every thread of this process on CPU `cpu` only (threads started later inherit it).
pub fn pin_process(cpu: usize) -> Result<()> {
    for task in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let tid = task?.file_name().to_string_lossy().parse::<libc::pid_t>()?;
        pin_thread(tid, cpu)?;
    }
    Ok(())
}

/// The write pass both floors share: one rendered response written to every waiting player.
struct Pass<'a> {
    response: Vec<u8>,
    response_len: usize,
    published_header: &'a str,
    measuring: &'a AtomicBool,
    cost: WriteCost,
}

impl Pass<'_> {
    /// Render this publication's response and write it to every waiting player in turn.
    fn run<'p>(&mut self, players: impl Iterator<Item = &'p mut Player>) {
        render(&mut self.response, self.response_len, self.published_header);
        let before = thread_cpu_us();
        let mut writes = 0;
        for p in players.filter(|p| p.waiting) {
            if write_all(&mut p.stream, &self.response).is_ok() {
                writes += 1;
            }
            p.waiting = false;
        }
        if self.measuring.load(Ordering::Relaxed) {
            self.cost.writes += writes;
            self.cost.cpu_us += thread_cpu_us() - before;
        }
    }
}

/// Accept whoever is queued on `listener`: nonblocking, no Nagle.
fn accept_all(listener: &TcpListener, mut add: impl FnMut(TcpStream) -> Result<()>) -> Result<()> {
    while let Ok((stream, _)) = listener.accept() {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        add(stream)?;
    }
    Ok(())
}

/// The floor that sweeps every socket with a read every few milliseconds between passes.
fn serve_polled(
    listener: TcpListener,
    period: Duration,
    stop: &AtomicBool,
    mut pass: Pass,
) -> Result<WriteCost> {
    let mut players: Vec<Player> = Vec::new();
    let mut scratch = [0u8; 4096];
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Relaxed) {
        accept_all(&listener, |stream| {
            players.push(Player::new(stream));
            Ok(())
        })?;
        players.retain_mut(|p| read_requests(p, &mut scratch));
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            continue;
        }
        next += period;
        pass.run(players.iter_mut());
    }
    Ok(pass.cost)
}

/// The poll token of the listening socket (players' tokens are their indices).
const LISTENER: Token = Token(usize::MAX);

/// The floor that reads each request once, when epoll says it arrived.
fn serve_epoll(
    listener: TcpListener,
    period: Duration,
    stop: &AtomicBool,
    mut pass: Pass,
) -> Result<WriteCost> {
    let mut poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    registry.register(
        &mut SourceFd(&listener.as_raw_fd()),
        LISTENER,
        Interest::READABLE,
    )?;
    // Closed players stay as `None` so that the others keep their tokens.
    let mut players: Vec<Option<Player>> = Vec::new();
    let mut scratch = [0u8; 4096];
    let mut events = Events::with_capacity(1024);
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            next += period;
            pass.run(players.iter_mut().flatten());
            continue;
        }
        // Woken at least every 5 ms to see `stop`.
        match poll.poll(
            &mut events,
            Some((next - now).min(Duration::from_millis(5))),
        ) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => r?,
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_all(&listener, |stream| {
                    // The registration tokio makes for a `TcpStream` (mio's: both interests,
                    // edge-triggered), as the packager's sockets have.
                    registry.register(
                        &mut SourceFd(&stream.as_raw_fd()),
                        Token(players.len()),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    players.push(Some(Player::new(stream)));
                    Ok(())
                })?;
            } else if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                let slot = &mut players[ev.token().0];
                if slot
                    .as_mut()
                    .is_some_and(|p| !read_arrived(p, &mut scratch))
                {
                    // Closing the socket takes it out of the epoll set.
                    *slot = None;
                }
            }
        }
    }
    Ok(pass.cost)
}

impl Player {
    fn new(stream: TcpStream) -> Player {
        Player {
            stream,
            tail: [0; 4],
            waiting: false,
        }
    }

    /// Take in request bytes; a request ends with an empty line.
    fn take(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.tail = [self.tail[1], self.tail[2], self.tail[3], b];
            if &self.tail == b"\r\n\r\n" {
                self.waiting = true;
            }
        }
    }
}

/// Read what arrived on an edge-triggered socket: a read shorter than the buffer emptied it,
/// so a request costs one `read` (as the packager's front reads). `false` once it hung up.
fn read_arrived(p: &mut Player, scratch: &mut [u8]) -> bool {
    loop {
        match p.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => {
                p.take(&scratch[..n]);
                if n < scratch.len() {
                    return true;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Read whatever the player sent; `false` once it hung up.
fn read_requests(p: &mut Player, scratch: &mut [u8]) -> bool {
    loop {
        match p.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => p.take(&scratch[..n]),
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
        accept_all(&listener, |mut stream| {
            if write_all(&mut stream, b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_ok() {
                socks.push(stream);
            }
            last_accept = Instant::now();
            Ok(())
        })?;
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
        for reads in [FloorReads::Epoll, FloorReads::Polled] {
            let server =
                FloorServer::start(800, Duration::from_millis(50), "x-pub", reads, None).unwrap();
            server.measuring.store(true, Ordering::Relaxed);
            // Two players: one that asks twice, one that hangs up after connecting (its slot
            // is dropped and the other keeps being answered).
            let mut c = TcpStream::connect(server.addr).unwrap();
            drop(TcpStream::connect(server.addr).unwrap());
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            for _ in 0..2 {
                // The request in two pieces: only its empty line makes it wait.
                c.write_all(b"GET /floor HTTP/1.1\r\n").unwrap();
                std::thread::sleep(Duration::from_millis(10));
                c.write_all(b"Host: x\r\n\r\n").unwrap();
                let mut buf = vec![0u8; 800];
                c.read_exact(&mut buf).unwrap();
                got.push(buf);
            }
            let cost = server.stop().unwrap();
            assert_eq!(cost.writes, 2, "{reads:?}");
            assert!(got.iter().all(|r| r.starts_with(b"HTTP/1.1 200 OK\r\n")));
        }
    }
}
