//! `amphi-tools bench udp-send`: the edge's fan-out send path (`sendmmsg` batches, `amphi_edge::batch`)
//! side by side with `quinn-udp` (one `sendmsg` per datagram, and with GSO where a listener gets
//! several equal-size datagrams at once) and with one plain `send_to` per datagram, in
//! interleaved rounds on loopback. It answers whether the edge should drop its hand-made batching
//! for `quinn-udp`.

use crate::loadgen_webrtc::{loopback_send_cost, FloorReceivers};
use anyhow::{ensure, Result};
use clap::Args;
use quinn_udp::{Transmit, UdpSocketState};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

/// `amphi-tools bench udp-send` options.
#[derive(Args, Debug, Clone)]
pub struct UdpSendArgs {
    /// Listeners (loopback receive sockets) a round fans out to.
    #[arg(long, default_value_t = 200)]
    listeners: usize,
    /// Datagrams each listener gets per round (speaker slots).
    #[arg(long, default_value_t = 3)]
    slots: usize,
    /// Largest datagram in bytes (an SRTP Opus packet at 32 kb/s is about 120 B).
    #[arg(long, default_value_t = 120)]
    len: usize,
    /// Give every datagram the same size (GSO's best case). By default each listener's
    /// datagrams of a round differ in size, as different speakers' Opus packets do, and GSO can
    /// only join a run of equal sizes (the last one may be shorter).
    #[arg(long)]
    equal_sizes: bool,
    /// Datagrams per measurement.
    #[arg(long, default_value_t = 200_000)]
    datagrams: usize,
    /// Interleaved rounds (each path measured once per round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Short run for CI.
    #[arg(long)]
    smoke: bool,
}

/// A send path under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The edge's `sendmmsg` batching (`amphi_edge::batch::send_batches`).
    Sendmmsg,
    /// `quinn-udp`, one transmit (one `sendmsg`) per datagram.
    QuinnUdp,
    /// `quinn-udp` with GSO: each listener's datagrams of a round in one transmit.
    QuinnUdpGso,
    /// One `send_to` per datagram.
    SendTo,
}

impl Path {
    const ALL: [Path; 4] = [
        Path::Sendmmsg,
        Path::QuinnUdp,
        Path::QuinnUdpGso,
        Path::SendTo,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Sendmmsg => "sendmmsg batches (edge today)",
            Path::QuinnUdp => "quinn-udp, one sendmsg each",
            Path::QuinnUdpGso => "quinn-udp with GSO per listener",
            Path::SendTo => "send_to, one each",
        }
    }
}

/// The datagrams of one round for `round` (one entry per listener): each listener's `slots`
/// datagrams, in listener order; unless `equal`, of sizes between 2/3 of and the entry's full
/// length, fixed per listener and slot (a deterministic pseudo-random pick).
fn fan_out<'a>(
    round: &[(SocketAddr, &'a [u8])],
    slots: usize,
    equal: bool,
) -> Vec<(SocketAddr, &'a [u8])> {
    let mut out = Vec::with_capacity(round.len() * slots);
    for (i, &(d, b)) in round.iter().enumerate() {
        for s in 0..slots {
            let size = if equal {
                b.len()
            } else {
                let spread = b.len() / 3 + 1;
                let pick = (i as u64 * 2_654_435_761 + s as u64 * 40_503) % 1_000_003;
                b.len() - (pick as usize % spread)
            };
            out.push((d, &b[..size]));
        }
    }
    out
}

/// Split `all` (grouped by destination) into GSO transmits: runs to one destination whose
/// datagrams all have the first one's size, except that the last may be shorter. Returns
/// (start, count, segment size) per transmit.
fn gso_runs(all: &[(SocketAddr, &[u8])], max_segments: usize) -> Vec<(usize, usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let (dest, first) = all[i];
        let mut n = 1;
        while i + n < all.len() && n < max_segments && all[i + n].0 == dest {
            let len = all[i + n].1.len();
            if len > first.len() {
                break;
            }
            n += 1;
            if len < first.len() {
                break;
            }
        }
        runs.push((i, n, first.len()));
        i += n;
    }
    runs
}

/// CPU µs per datagram of `path`.
fn measure(path: Path, args: &UdpSendArgs) -> Result<f64> {
    let slots = args.slots.max(1);
    let entries = args.datagrams / slots;
    let equal = args.equal_sizes;
    let mut gso_buf = Vec::with_capacity(args.len * slots);
    let mut state: Option<UdpSocketState> = None;
    loopback_send_cost(
        args.listeners,
        entries,
        args.len,
        FloorReceivers::Polled,
        Duration::from_millis(1),
        |sender, round| {
            let state = match &mut state {
                Some(s) => s,
                None => match UdpSocketState::new(sender.into()) {
                    Ok(s) => state.insert(s),
                    Err(_) => return 0,
                },
            };
            match path {
                Path::Sendmmsg => {
                    let all = fan_out(round, slots, equal);
                    amphi_edge::batch::send_batches(sender, &all, |(d, b)| (*d, b)).sent
                }
                Path::SendTo => fan_out(round, slots, equal)
                    .iter()
                    .filter(|(d, b)| sender.send_to(b, d).is_ok())
                    .count(),
                Path::QuinnUdp => fan_out(round, slots, equal)
                    .iter()
                    .filter(|(d, b)| {
                        state
                            .try_send(sender.into(), &transmit(*d, b, None))
                            .is_ok()
                    })
                    .count(),
                Path::QuinnUdpGso => {
                    let all = fan_out(round, slots, equal);
                    let mut sent = 0;
                    for (start, n, segment) in gso_runs(&all, state.max_gso_segments()) {
                        gso_buf.clear();
                        for (_, b) in &all[start..start + n] {
                            gso_buf.extend_from_slice(b);
                        }
                        let t = transmit(all[start].0, &gso_buf, (n > 1).then_some(segment));
                        if state.try_send(sender.into(), &t).is_ok() {
                            sent += n;
                        }
                    }
                    sent
                }
            }
        },
    )
    .map(|cost| cost.us_per_datagram)
}

fn transmit(destination: SocketAddr, contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
    Transmit {
        destination,
        ecn: None,
        contents,
        segment_size,
        src_ip: None,
    }
}

/// Median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the benchmark and print one line per path.
pub fn run(mut args: UdpSendArgs) -> Result<()> {
    if args.smoke {
        args.datagrams = args.datagrams.min(6_000);
        args.rounds = 1;
        args.listeners = args.listeners.min(20);
    }
    ensure!(args.listeners > 0 && args.rounds > 0, "nothing to measure");
    let gso = UdpSocketState::new((&UdpSocket::bind("127.0.0.1:0")?).into())?.max_gso_segments();
    println!(
        "udp fan-out send path: {} listeners x {} slots, {} datagrams of {} B, {} datagrams per path per round, {} interleaved rounds (kernel GSO segments: {gso})",
        args.listeners,
        args.slots,
        if args.equal_sizes { "equal" } else { "mixed" },
        args.len,
        args.datagrams,
        args.rounds
    );
    let mut costs: Vec<Vec<f64>> = vec![Vec::new(); Path::ALL.len()];
    for _ in 0..args.rounds {
        for (i, path) in Path::ALL.iter().enumerate() {
            costs[i].push(measure(*path, &args)?);
        }
    }
    let medians: Vec<f64> = costs.into_iter().map(median).collect();
    let base = medians[0];
    for (path, m) in Path::ALL.iter().zip(&medians) {
        println!(
            "  {:<34} {m:>6.2} us CPU/datagram  ({:.2}x the edge's path)",
            path.name(),
            m / base
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_delivers_the_fan_out() {
        // Each path sends every datagram of a small fan-out (a path that sent nothing would fail
        // `loopback_send_cost`'s check).
        let args = UdpSendArgs {
            listeners: 4,
            slots: 3,
            len: 100,
            equal_sizes: false,
            datagrams: 1_200,
            rounds: 1,
            smoke: false,
        };
        for path in Path::ALL {
            let cost = measure(path, &args).unwrap();
            assert!(cost.is_finite() && cost > 0.0, "{path:?}: {cost}");
        }
    }

    #[test]
    fn fan_out_repeats_each_listener_per_slot() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let all = fan_out(&[(a, &b"x"[..]), (b, &b"y"[..])], 2, true);
        let dests: Vec<SocketAddr> = all.iter().map(|(d, _)| *d).collect();
        assert_eq!(dests, vec![a, a, b, b]);
    }

    #[test]
    fn gso_joins_only_equal_sizes_with_a_shorter_last() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let p = [0u8; 10];
        let all = [
            (a, &p[..10]),
            (a, &p[..10]),
            (a, &p[..8]),
            (a, &p[..8]),
            (a, &p[..9]),
            (b, &p[..9]),
        ];
        // 10,10,8 | 8,(9 is longer) | 9 | b's 9.
        assert_eq!(
            gso_runs(&all, 64),
            vec![(0, 3, 10), (3, 1, 8), (4, 1, 9), (5, 1, 9)]
        );
        assert_eq!(gso_runs(&all[..2], 1), vec![(0, 1, 10), (1, 1, 10)]);
    }
}
