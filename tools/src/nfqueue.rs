//! A minimal NFQUEUE client over raw netlink (Linux): bind a queue, receive queued IPv4 packets
//! (id + the first bytes of the header), give verdicts in any order. No allocation per packet:
//! one receive buffer, one verdict buffer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NLMSG_HDR: usize = 16;
const NFGEN_HDR: usize = 4;

/// A verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Accept,
    /// Drop it.
    Drop,
}

/// One queued packet: its id and the copied head of the packet (up to the copy range).
pub struct Packet<'a> {
    /// Packet id (for the verdict).
    pub id: u32,
    /// The packet's first bytes.
    pub head: &'a [u8],
}

/// A bound NFQUEUE.
pub struct Queue {
    fd: OwnedFd,
    queue: u16,
    seq: u32,
    buf: Vec<u8>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

impl Queue {
    /// Open a netlink socket and bind queue `queue` for IPv4, copying `copy_range` bytes of each
    /// packet, with room for `max_len` queued packets in the kernel.
    pub fn bind(queue: u16, copy_range: u32, max_len: u32) -> io::Result<Queue> {
        // SAFETY: plain socket syscalls on a descriptor we own.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is valid; sizes match.
        unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            if libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        set_int(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_NO_ENOBUFS,
            1,
        )?;
        // Best effort: a deep receive buffer (held packets are ids only).
        let _ = set_int(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            8 << 20,
        );
        let mut q = Queue {
            fd,
            queue,
            seq: 0,
            buf: vec![0u8; 1 << 16],
        };
        let mut cmd = [0u8; 4];
        cmd[0] = NFQNL_CFG_CMD_BIND;
        cmd[2..4].copy_from_slice(&(libc::AF_INET as u16).to_be_bytes());
        q.request(NFQNL_MSG_CONFIG, 0, &[(NFQA_CFG_CMD, &cmd)])?;
        let mut params = [0u8; 5];
        params[..4].copy_from_slice(&copy_range.to_be_bytes());
        params[4] = NFQNL_COPY_PACKET;
        q.request(
            NFQNL_MSG_CONFIG,
            0,
            &[
                (NFQA_CFG_PARAMS, &params),
                (NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()),
            ],
        )?;
        Ok(q)
    }

    /// The netlink descriptor (poll it for readability).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Build and send one message; with `ack` wait for the kernel's answer.
    fn request(&mut self, kind: u16, family: u8, attrs: &[(u16, &[u8])]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&[0u8; NLMSG_HDR]);
        msg.extend_from_slice(&[family, 0]);
        msg.extend_from_slice(&self.queue.to_be_bytes());
        for (k, d) in attrs {
            put_attr(&mut msg, *k, d);
        }
        self.write_header(
            &mut msg,
            kind,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        );
        self.send(&msg)?;
        // Wait for the ack (an NLMSG_ERROR with error 0).
        for _ in 0..64 {
            let n = self.recv_raw(false)?.unwrap_or(0);
            let mut off = 0;
            while off + NLMSG_HDR <= n {
                let len = u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(self.buf[off + 4..off + 6].try_into().unwrap());
                if len < NLMSG_HDR || off + len > n {
                    break;
                }
                if ty == libc::NLMSG_ERROR as u16 && len >= NLMSG_HDR + 4 {
                    let err = i32::from_ne_bytes(
                        self.buf[off + NLMSG_HDR..off + NLMSG_HDR + 4]
                            .try_into()
                            .unwrap(),
                    );
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-err))
                    };
                }
                off += align4(len);
            }
        }
        Err(io::Error::other("no netlink acknowledgement"))
    }

    fn write_header(&self, msg: &mut [u8], kind: u16, flags: u16) {
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        msg[12..16].copy_from_slice(&0u32.to_ne_bytes());
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a valid buffer of msg.len() bytes; the kernel is the destination (0).
        let n = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &to as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram into the buffer; `Ok(None)` when nothing is waiting (non-blocking).
    fn recv_raw(&mut self, nonblocking: bool) -> io::Result<Option<usize>> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                flags,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Receive one datagram if one is waiting (without blocking) and append each queued packet
    /// in it to `out` as (id, `map(head)`). Returns false when nothing was waiting.
    pub fn recv_batch<T>(
        &mut self,
        out: &mut Vec<(u32, T)>,
        map: impl Fn(&[u8]) -> T,
    ) -> io::Result<bool> {
        let Some(n) = self.recv_raw(true)? else {
            return Ok(false);
        };
        let mut off = 0;
        while off + NLMSG_HDR + NFGEN_HDR <= n {
            let len = u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(self.buf[off + 4..off + 6].try_into().unwrap());
            if len < NLMSG_HDR || off + len > n {
                break;
            }
            if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                if let Some(p) = parse_packet(&self.buf[off + NLMSG_HDR + NFGEN_HDR..off + len]) {
                    out.push((p.id, map(p.head)));
                }
            }
            off += align4(len);
        }
        Ok(true)
    }

    /// Give packet `id` its verdict.
    pub fn verdict(&mut self, id: u32, verdict: Verdict) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = [0u8; NLMSG_HDR + NFGEN_HDR + 12];
        msg[NLMSG_HDR..NLMSG_HDR + 4].copy_from_slice(&[0, 0, 0, 0]);
        msg[NLMSG_HDR + 2..NLMSG_HDR + 4].copy_from_slice(&self.queue.to_be_bytes());
        let a = NLMSG_HDR + NFGEN_HDR;
        msg[a..a + 2].copy_from_slice(&12u16.to_ne_bytes());
        msg[a + 2..a + 4].copy_from_slice(&NFQA_VERDICT_HDR.to_ne_bytes());
        let v: u32 = match verdict {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
        };
        msg[a + 4..a + 8].copy_from_slice(&v.to_be_bytes());
        msg[a + 8..a + 12].copy_from_slice(&id.to_be_bytes());
        self.write_header(&mut msg, NFQNL_MSG_VERDICT, libc::NLM_F_REQUEST as u16);
        self.send(&msg)
    }
}

/// The id and payload head of one `NFQNL_MSG_PACKET`'s attributes.
fn parse_packet(mut attrs: &[u8]) -> Option<Packet<'_>> {
    let (mut id, mut head) = (None, &[][..]);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        match kind {
            NFQA_PACKET_HDR if data.len() >= 4 => {
                id = Some(u32::from_be_bytes(data[..4].try_into().ok()?))
            }
            NFQA_PAYLOAD => head = data,
            _ => {}
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Some(Packet { id: id?, head })
}

fn set_int(fd: RawFd, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: v is a valid int for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until `fd` is readable or `timeout` passes (`None`: forever). Returns whether readable.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    // SAFETY: pfd and ts live across the call; a null timeout means block.
    let r = unsafe {
        libc::ppoll(
            &mut pfd,
            1,
            ts.as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec),
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_attributes_parse_and_bad_ones_are_refused() {
        let mut m = Vec::new();
        put_attr(&mut m, NFQA_PACKET_HDR, &[0, 0, 1, 2, 8, 0, 1]);
        put_attr(&mut m, NFQA_PAYLOAD, &[0x45, 0, 0, 20]);
        let p = parse_packet(&m).unwrap();
        assert_eq!(p.id, 258);
        assert_eq!(p.head, &[0x45, 0, 0, 20]);
        // No header: no packet. A length past the end: stop, no panic.
        let mut m = Vec::new();
        put_attr(&mut m, NFQA_PAYLOAD, &[1, 2]);
        assert!(parse_packet(&m).is_none());
        assert!(parse_packet(&[200, 0, 1, 0, 0, 0]).is_none());
    }
}
