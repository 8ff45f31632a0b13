//! Batched UDP sends: every datagram the media driver produced while handling one input goes out
//! in as few `sendmmsg(2)` calls as possible (Linux), falling back to one `send_to` each elsewhere.

use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::time::Instant;
use str0m::net::DatagramSend;
use tokio::net::UdpSocket;

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;

/// A queued datagram: destination, bytes, and the ingress time of the forwarded packet it carries
/// (for the forwarding-delay histogram), if any.
pub(crate) type Queued = (SocketAddr, DatagramSend, Option<Instant>);

/// Send and clear `outbox`. A full socket buffer drops the rest (counted), like a router would.
pub(crate) fn send_all(socket: &UdpSocket, outbox: &mut Vec<Queued>, metrics: &Metrics) {
    let sent = send_batches(socket, outbox);
    let now = Instant::now();
    for (_, _, ingress) in &outbox[..sent] {
        if let Some(at) = ingress {
            metrics.forward_delay(now.saturating_duration_since(*at));
        }
    }
    if sent < outbox.len() {
        metrics.udp_send_errors((outbox.len() - sent) as u64);
    }
    outbox.clear();
}

#[cfg(target_os = "linux")]
fn send_batches(socket: &UdpSocket, outbox: &[Queued]) -> usize {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let mut done = 0;
    while done < outbox.len() {
        let chunk = &outbox[done..(done + BATCH).min(outbox.len())];
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, (dest, data, _)) in chunk.iter().enumerate() {
            let len = write_sockaddr(*dest, &mut addrs[i]);
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
        // SAFETY: `msgs[..chunk.len()]` point at live buffers (`addrs`, `iovs`, the datagrams in
        // `outbox`) that outlive the call; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                chunk.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            let err = std::io::Error::last_os_error();
            tracing::debug!(error = %err, "sendmmsg failed");
            // Skip the datagram that failed (e.g. an unreachable destination) and go on.
            if n < 0 && err.kind() == std::io::ErrorKind::WouldBlock {
                break;
            }
            let (dest, data, _) = &chunk[0];
            if socket.try_send_to(data, *dest).is_ok() {
                done += 1;
                continue;
            }
            return done;
        }
        done += n as usize;
    }
    done
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

#[cfg(not(target_os = "linux"))]
fn send_batches(socket: &UdpSocket, outbox: &[Queued]) -> usize {
    let mut done = 0;
    for (dest, data, _) in outbox {
        if socket.try_send_to(data, *dest).is_err() {
            break;
        }
        done += 1;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_reach_their_destinations() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dest = rx.local_addr().unwrap();
        let mut outbox: Vec<Queued> = (0..100u8)
            .map(|i| (dest, DatagramSend::from(vec![i; 10]), Some(Instant::now())))
            .collect();
        let metrics = Metrics::new("us-east");
        send_all(&tx, &mut outbox, &metrics);
        assert!(outbox.is_empty());
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
