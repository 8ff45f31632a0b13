//! Free loopback ports and scratch directories, for tests and benchmarks alike.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

/// How many ports [`free_port`] tries before it gives up.
const PORT_TRIES: usize = 64;

/// A loopback address whose port was free for both TCP and UDP when asked (bound, then released),
/// so one helper serves HTTP listeners, QUIC endpoints and media sockets. Another process may take
/// the port before the caller binds it; tests that race for ports use distinct ranges instead.
pub fn free_port() -> io::Result<SocketAddr> {
    for _ in 0..PORT_TRIES {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = udp.local_addr()?;
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no loopback port free for both TCP and UDP in {PORT_TRIES} tries"),
    ))
}

/// A fresh, empty scratch directory under the system temp directory, unique to this call
/// (`amphi-{tag}-{pid}-{nanos}`).
pub fn scratch_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("amphi-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating scratch directory {}: {e}", dir.display()));
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable_for_tcp_and_udp() {
        let addr = free_port().unwrap();
        assert!(addr.ip().is_loopback());
        drop(TcpListener::bind(addr).unwrap());
        drop(UdpSocket::bind(addr).unwrap());
    }

    #[test]
    fn scratch_dirs_are_distinct_and_empty() {
        let (a, b) = (scratch_dir("net-test"), scratch_dir("net-test"));
        assert_ne!(a, b);
        assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
        std::fs::remove_dir_all(a).unwrap();
        std::fs::remove_dir_all(b).unwrap();
    }
}
