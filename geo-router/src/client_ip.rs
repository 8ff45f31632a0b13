//! The client's address (sans-IO): the TCP peer, or — when the peer is a configured trusted proxy —
//! the nearest untrusted hop named in `Forwarded` (RFC 7239) or `X-Forwarded-For`. Headers from
//! untrusted peers are ignored, so a client cannot pretend to be elsewhere.

use ipnet::IpNet;
use std::net::IpAddr;

/// Longest forwarding header considered, in bytes.
pub const MAX_FORWARD_HEADER: usize = 4096;
/// Most hops considered in a forwarding header.
pub const MAX_HOPS: usize = 32;

/// Why a forwarding header from a trusted proxy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// A hop is not an IP address (obfuscated identifiers are refused too).
    #[error("forwarding header names a hop that is not an IP address: {0:?}")]
    BadHop(String),
    /// The header is longer than [`MAX_FORWARD_HEADER`] or has more than [`MAX_HOPS`] hops.
    #[error("forwarding header too long")]
    TooLong,
    /// The header is not valid text.
    #[error("forwarding header is not ASCII")]
    NotText,
}

/// Where the client address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The TCP peer itself.
    Peer,
    /// The TCP peer is untrusted and sent forwarding headers, which were ignored.
    PeerHeadersIgnored,
    /// A forwarding header added by a trusted proxy.
    Forwarded,
}

/// Whether `ip` is inside one of `trusted`.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Parse one hop: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]`, `[2001:db8::1]:80`, `2001:db8::1`,
/// optionally in double quotes.
fn parse_hop(raw: &str) -> Result<IpAddr, ForwardError> {
    let bad = || ForwardError::BadHop(raw.chars().take(64).collect());
    let s = raw.trim().trim_matches('"');
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']').ok_or_else(bad)?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || (after.starts_with(':') && after[1..].parse::<u16>().is_ok())) {
            return Err(bad());
        }
        return rest[..end].parse().map_err(|_| bad());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.contains(':') => {
            host.parse().map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// Hops named by an RFC 7239 `Forwarded` header, in order (client first).
fn forwarded_hops(value: &str, out: &mut Vec<IpAddr>) -> Result<(), ForwardError> {
    for element in value.split(',') {
        for pair in element.split(';') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("for") {
                out.push(parse_hop(v)?);
                if out.len() > MAX_HOPS {
                    return Err(ForwardError::TooLong);
                }
            }
        }
    }
    Ok(())
}

fn xff_hops(value: &str, out: &mut Vec<IpAddr>) -> Result<(), ForwardError> {
    for hop in value.split(',') {
        if hop.trim().is_empty() {
            continue;
        }
        out.push(parse_hop(hop)?);
        if out.len() > MAX_HOPS {
            return Err(ForwardError::TooLong);
        }
    }
    Ok(())
}

/// The client address of a request from `peer` carrying these header values (each header may
/// appear several times). `Forwarded` wins over `X-Forwarded-For` when both are present.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded: impl Iterator<Item = &'a [u8]>,
    x_forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> Result<(IpAddr, Source), ForwardError> {
    let mut fwd = forwarded.peekable();
    let mut xff = x_forwarded_for.peekable();
    let has_headers = fwd.peek().is_some() || xff.peek().is_some();
    if !is_trusted(peer, trusted) {
        let src = if has_headers {
            Source::PeerHeadersIgnored
        } else {
            Source::Peer
        };
        return Ok((peer, src));
    }
    let mut hops = Vec::new();
    let mut total = 0usize;
    let text = |b: &'a [u8], total: &mut usize| -> Result<&'a str, ForwardError> {
        *total += b.len();
        if *total > MAX_FORWARD_HEADER {
            return Err(ForwardError::TooLong);
        }
        std::str::from_utf8(b).map_err(|_| ForwardError::NotText)
    };
    if fwd.peek().is_some() {
        for v in fwd {
            forwarded_hops(text(v, &mut total)?, &mut hops)?;
        }
    } else {
        for v in xff {
            xff_hops(text(v, &mut total)?, &mut hops)?;
        }
    }
    // Walk back from the proxy nearest to us; the first hop that is not a trusted proxy is the
    // client. If every hop is trusted, the farthest one is.
    match hops.iter().rev().find(|ip| !is_trusted(**ip, trusted)) {
        Some(ip) => Ok((canonical(*ip), Source::Forwarded)),
        None => match hops.first() {
            Some(ip) => Ok((canonical(*ip), Source::Forwarded)),
            None => Ok((peer, Source::Peer)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn run(
        peer: &str,
        fwd: &[&str],
        xff: &[&str],
        trusted: &[IpNet],
    ) -> Result<(IpAddr, Source), ForwardError> {
        client_ip(
            ip(peer),
            fwd.iter().map(|s| s.as_bytes()),
            xff.iter().map(|s| s.as_bytes()),
            trusted,
        )
    }

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let t = nets(&["10.0.0.0/8"]);
        assert_eq!(
            run("203.0.113.9", &[], &["8.8.8.8"], &t),
            Ok((ip("203.0.113.9"), Source::PeerHeadersIgnored))
        );
        assert_eq!(
            run("203.0.113.9", &["for=8.8.8.8"], &[], &t),
            Ok((ip("203.0.113.9"), Source::PeerHeadersIgnored))
        );
        assert_eq!(
            run("203.0.113.9", &[], &[], &t),
            Ok((ip("203.0.113.9"), Source::Peer))
        );
        // Garbage from an untrusted peer is ignored, not an error.
        assert!(run("203.0.113.9", &[], &["not an ip"], &t).is_ok());
    }

    #[test]
    fn trusted_proxies_name_the_client() {
        let t = nets(&["10.0.0.0/8", "2001:db8:1::/48"]);
        // Client, then a spoofed entry the client added, then our proxies.
        assert_eq!(
            run("10.0.0.2", &[], &["1.1.1.1, 8.8.8.8, 10.0.0.5"], &t),
            Ok((ip("8.8.8.8"), Source::Forwarded))
        );
        assert_eq!(
            run("10.0.0.2", &[], &["1.1.1.1", "8.8.8.8"], &t),
            Ok((ip("8.8.8.8"), Source::Forwarded))
        );
        assert_eq!(
            run(
                "10.0.0.2",
                &[r#"for="[2a00:1450::1]:4711";proto=https, for=10.0.0.9"#],
                &["9.9.9.9"],
                &t
            ),
            Ok((ip("2a00:1450::1"), Source::Forwarded))
        );
        assert_eq!(
            run("10.0.0.2", &["For=1.1.1.1:443"], &[], &t),
            Ok((ip("1.1.1.1"), Source::Forwarded))
        );
        assert_eq!(
            run("::ffff:10.0.0.2", &[], &["::ffff:8.8.8.8"], &t),
            Ok((ip("8.8.8.8"), Source::Forwarded))
        );
        // Only proxies in the chain: the farthest one.
        assert_eq!(
            run("10.0.0.2", &[], &["10.1.1.1, 10.0.0.5"], &t),
            Ok((ip("10.1.1.1"), Source::Forwarded))
        );
        assert_eq!(
            run("10.0.0.2", &[], &[], &t),
            Ok((ip("10.0.0.2"), Source::Peer))
        );
    }

    #[test]
    fn malformed_headers_from_trusted_proxies_are_errors() {
        let t = nets(&["127.0.0.0/8"]);
        for bad in [
            "999.1.1.1",
            "8.8.8.8:99999",
            "[::1",
            "unknown",
            "_hidden",
            "1.2.3",
        ] {
            assert!(
                matches!(
                    run("127.0.0.1", &[], &[bad], &t),
                    Err(ForwardError::BadHop(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            run("127.0.0.1", &["for=_obf"], &[], &t),
            Err(ForwardError::BadHop(_))
        ));
        let long = vec!["8.8.8.8"; 40].join(",");
        assert_eq!(
            run("127.0.0.1", &[], &[&long], &t),
            Err(ForwardError::TooLong)
        );
        let bytes: &[u8] = &[0xff, 0xfe];
        assert_eq!(
            client_ip(
                ip("127.0.0.1"),
                std::iter::empty(),
                std::iter::once(bytes),
                &t
            ),
            Err(ForwardError::NotText)
        );
    }
}
