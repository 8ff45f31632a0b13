//! Batched UDP sends: every datagram the media driver produced while handling one input goes out
//! in as few `sendmmsg(2)` calls as possible (Linux), falling back to one `send_to` each elsewhere.
//! [`send_batches`] is public so benchmarks can measure the kernel's cost of the same send path.

use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::time::Instant;
use str0m::net::DatagramSend;
use tokio::net::UdpSocket;

/// Datagrams per `sendmmsg` call.
pub const BATCH: usize = 64;

/// The bytes of a queued datagram: one str0m produced, or one the media core wrote into the
/// outbox's shared buffer (a forwarded packet protected by [`crate::srtp_out`]).
#[derive(Debug)]
pub(crate) enum Datagram {
    /// A str0m transmit (ICE, DTLS, RTCP, and RTP of peers without the fast path).
    Rtc(DatagramSend),
    /// `len` bytes at `start` in [`Outbox::buf`].
    Written { start: u32, len: u32 },
}

/// A queued datagram: destination, bytes, and the ingress time of the forwarded packet it carries
/// (for the forwarding-delay histogram), if any.
pub(crate) type Queued = (SocketAddr, Datagram, Option<Instant>);

/// The datagrams of one turn and the buffer the written ones live in; both keep their capacity
/// when cleared, so a steady load allocates nothing for its fast-path datagrams.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// The datagrams, in sending order.
    pub(crate) items: Vec<Queued>,
    /// The bytes of the [`Datagram::Written`] ones.
    pub(crate) buf: Vec<u8>,
}

impl Outbox {
    /// An empty outbox with room for `items` datagrams and `bytes` bytes written in place.
    pub(crate) fn with_capacity(items: usize, bytes: usize) -> Outbox {
        Outbox {
            items: Vec::with_capacity(items),
            buf: Vec::with_capacity(bytes),
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The bytes of `d`.
    pub(crate) fn bytes<'a>(&'a self, d: &'a Datagram) -> &'a [u8] {
        match d {
            Datagram::Rtc(data) => &data[..],
            Datagram::Written { start, len } => {
                &self.buf[*start as usize..(*start + *len) as usize]
            }
        }
    }

    /// Forget every datagram (keeping the capacity).
    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.buf.clear();
    }
}

/// Send and clear `outbox`. A full socket buffer drops the rest (counted), like a router would.
pub(crate) fn send_all(socket: &UdpSocket, outbox: &mut Outbox, metrics: &Metrics) {
    let sent = {
        let queued: &Outbox = outbox;
        send_batches(socket, &queued.items, |(dest, data, _)| {
            (*dest, queued.bytes(data))
        })
    };
    let now = Instant::now();
    for (_, _, ingress) in &outbox.items[..sent.processed] {
        if let Some(at) = ingress {
            metrics.forward_delay(now.saturating_duration_since(*at));
        }
    }
    let failed = outbox.items.len() - sent.sent;
    if failed > 0 {
        metrics.udp_send_errors(failed as u64);
    }
    outbox.clear();
}

/// What [`send_batches`] did with a list of datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams dealt with, in order: sent, plus single datagrams the kernel refused (e.g. an
    /// unreachable destination), which are skipped. The rest hit a full socket buffer.
    pub processed: usize,
}

/// Send `items` (destination and bytes picked by `parts`) from `socket` without blocking, in
/// `sendmmsg(2)` calls of up to [`BATCH`] datagrams on Linux (one `send_to` each elsewhere).
/// Stops at a full socket buffer; a datagram the kernel refuses is skipped.
pub fn send_batches<'a, T>(
    socket: &impl std::os::fd::AsRawFd,
    items: &'a [T],
    parts: impl Fn(&'a T) -> (SocketAddr, &'a [u8]),
) -> BatchOutcome {
    let mut outcome = BatchOutcome {
        sent: 0,
        processed: 0,
    };
    while outcome.processed < items.len() {
        let chunk = &items[outcome.processed..(outcome.processed + BATCH).min(items.len())];
        match send_chunk(socket.as_raw_fd(), chunk, &parts) {
            Ok(n) => {
                outcome.sent += n;
                outcome.processed += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::debug!(error = %e, "datagram not sent");
                outcome.processed += 1;
            }
        }
    }
    outcome
}

/// One `sendmmsg(2)` call for up to [`BATCH`] datagrams; `Ok(n)` with `n >= 1` sent.
#[cfg(target_os = "linux")]
fn send_chunk<'a, T>(
    fd: std::os::fd::RawFd,
    chunk: &'a [T],
    parts: &impl Fn(&'a T) -> (SocketAddr, &'a [u8]),
) -> std::io::Result<usize> {
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, item) in chunk.iter().take(BATCH).enumerate() {
        let (dest, data) = parts(item);
        let len = write_sockaddr(dest, &mut addrs[i]);
        iovs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = &mut addrs[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
        hdr.msg_namelen = len;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs[..n]` point at live buffers (`addrs`, `iovs`, the datagrams in `chunk`) that
    // outlive the call; the kernel only reads them.
    let n = unsafe {
        libc::sendmmsg(
            fd,
            msgs.as_mut_ptr(),
            chunk.len().min(BATCH) as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        Ok(n as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One `sendto(2)` for the first datagram of `chunk`; `Ok(1)` if sent.
#[cfg(not(target_os = "linux"))]
fn send_chunk<'a, T>(
    fd: std::os::fd::RawFd,
    chunk: &'a [T],
    parts: &impl Fn(&'a T) -> (SocketAddr, &'a [u8]),
) -> std::io::Result<usize> {
    use std::os::fd::FromRawFd;
    let (dest, data) = parts(&chunk[0]);
    // SAFETY: the socket stays owned by the caller; ManuallyDrop keeps it open.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::UdpSocket::from_raw_fd(fd) });
    socket.send_to(data, dest).map(|_| 1)
}

#[cfg(target_os = "linux")]
fn write_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_reach_their_destinations() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dest = rx.local_addr().unwrap();
        // Half str0m's datagrams, half written in place, interleaved.
        let mut outbox = Outbox::default();
        for i in 0..100u8 {
            let data = if i % 2 == 0 {
                Datagram::Rtc(DatagramSend::from(vec![i; 10]))
            } else {
                let start = outbox.buf.len() as u32;
                outbox.buf.extend_from_slice(&[i; 10]);
                Datagram::Written { start, len: 10 }
            };
            outbox.items.push((dest, data, Some(Instant::now())));
        }
        let metrics = Metrics::new("us-east");
        send_all(&tx, &mut outbox, &metrics);
        assert!(outbox.is_empty() && outbox.buf.is_empty());
        let mut buf = [0u8; 64];
        for i in 0..100u8 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &[i; 10][..]);
        }
        assert!(metrics
            .render()
            .contains("amphi_edge_forward_delay_seconds_count 100"));
    }
}
