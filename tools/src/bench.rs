//! `amphi-tools bench ...`: the benchmarks (see BENCHMARKS.md), each printing its figure beside
//! the same-run floor it is compared with.

use crate::bench_mixer::MixerBenchOptions;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `amphi-tools bench ...`
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Our mixer vs `ffmpeg amix` + libopus on the same three Opus inputs, one thread each.
    Mixer {
        /// Seconds of audio to mix.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Short run for CI (5 s of audio).
        #[arg(long)]
        smoke: bool,
    },
    /// Ten speakers taking turns, libopus with and without DTX, through our mixer side by side:
    /// relay packets per second and mixer CPU.
    Dtx {
        /// Seconds of audio per speaker.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Short run for CI (5 s of audio).
        #[arg(long)]
        smoke: bool,
    },
    /// Ingest at the edge -> LL-HLS part listed in the playlist, through a dev mesh it starts.
    Latency {
        /// Tone bursts to time.
        #[arg(long, default_value_t = 40)]
        bursts: usize,
        /// Short run for CI (3 bursts).
        #[arg(long)]
        smoke: bool,
        /// Port offset of the dev mesh the benchmark starts.
        #[arg(long, default_value_t = 24_000)]
        port_offset: u16,
    },
    /// Speech through amphi for PESQ scoring (WHEP, HLS Opus, HLS AAC), with injected loss and
    /// jitter; `bench/quality/run.sh` runs the conditions and scores them.
    Quality(crate::bench_quality::QualityOptions),
    /// Edge SFU: CPU per delivered packet, loss, forwarding delay with N WebRTC subscribers.
    Sfu(crate::loadgen_webrtc::SfuArgs),
    /// The edge's fan-out send path (`sendmmsg` batches) vs `quinn-udp` (with and without GSO)
    /// and plain `send_to`, CPU per datagram on loopback, interleaved.
    UdpSend(crate::bench_udp::UdpSendArgs),
    /// Origin relay forwarding delay with one big room idle, then chatting at its limit.
    Relay(crate::bench_relay::RelayArgs),
    /// Geo-router route lookups/s over HTTP with wrk, side by side with a hyper hello-world.
    Route {
        /// Seconds of wrk load per server.
        #[arg(long, default_value_t = 8)]
        seconds: u32,
        /// wrk threads.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 64)]
        connections: u32,
        /// Router port (the hello-world server takes the next one).
        #[arg(long, default_value_t = 27_500)]
        port: u16,
        /// GeoIP City database for the router (repeat for IPv4 and IPv6 files).
        #[arg(long = "geoip", value_name = "FILE")]
        geoip: Vec<PathBuf>,
        /// Keep the router's directory and registry in this Redis (the production setup), e.g.
        /// `redis://127.0.0.1:6379/15`; the bench's room and edges stay there. In memory
        /// without it.
        #[arg(long, value_name = "URL")]
        redis_url: Option<String>,
        /// Rounds of wrk over every server in turn, even rounds in reverse order (the ratios'
        /// medians are the figure).
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Connections of the paced latency probe (each waits 1 ms after every answer, so both
        /// servers get the same load, far below saturation).
        #[arg(long, default_value_t = 16)]
        probe_connections: u32,
        /// Serve `/v1/route` through hyper like every other request (the router's
        /// `http1_fast_path = false`), to compare with the fast path.
        #[arg(long)]
        hyper_only: bool,
        /// Short run for CI (1 s per server, one round).
        #[arg(long)]
        smoke: bool,
    },
}

/// Run `amphi-tools bench`.
pub async fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Mixer { seconds, smoke } => {
            let options = if smoke {
                MixerBenchOptions::smoke()
            } else {
                MixerBenchOptions {
                    seconds,
                    speakers: 3,
                }
            };
            let report =
                tokio::task::spawn_blocking(move || crate::bench_mixer::run_mixer_bench(options))
                    .await??;
            println!("{report}");
        }
        BenchCommand::Dtx { seconds, smoke } => {
            let seconds = if smoke { 5 } else { seconds };
            let report =
                tokio::task::spawn_blocking(move || crate::bench_mixer::run_dtx_bench(seconds))
                    .await??;
            println!("{report}");
        }
        BenchCommand::Latency {
            bursts,
            smoke,
            port_offset,
        } => {
            crate::bench_latency::run(crate::bench_latency::LatencyOptions {
                bursts: if smoke { 3 } else { bursts },
                port_offset,
            })
            .await?;
        }
        BenchCommand::Quality(opts) => crate::bench_quality::run(opts).await?,
        BenchCommand::Sfu(args) => crate::loadgen_webrtc::bench(args).await?,
        BenchCommand::Relay(args) => crate::bench_relay::run(args).await?,
        BenchCommand::UdpSend(args) => {
            tokio::task::spawn_blocking(move || crate::bench_udp::run(args)).await??
        }
        BenchCommand::Route {
            seconds,
            threads,
            connections,
            port,
            geoip,
            redis_url,
            rounds,
            probe_connections,
            hyper_only,
            smoke,
        } => {
            crate::bench_route::run(crate::bench_route::RouteBenchOptions {
                seconds: if smoke { 1 } else { seconds },
                threads,
                connections: if smoke { 8 } else { connections },
                port,
                geoip,
                redis_url,
                rounds: if smoke { 1 } else { rounds },
                probe_connections: if smoke { 4 } else { probe_connections },
                hyper_only,
            })
            .await?
        }
    }
    Ok(())
}
