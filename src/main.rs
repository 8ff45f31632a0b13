//! `amphi`: one binary for every role of the live audio mesh, plus the all-in-one `dev` mesh.

mod bench_latency;
mod bench_quality;
mod bench_relay;
mod bench_route;
mod bench_udp;
mod cert;
mod child_mesh;
mod config;
mod dev;
mod loadgen_hls;
mod loadgen_room;
mod loadgen_webrtc;
mod plan;
mod roles;
mod tcp_floor;
mod web;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// amphi: live audio rooms — edge SFUs, QUIC origin mixer, LL-HLS packager, geo-router.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole mesh on loopback: geo-router, one edge per region, origin, packager, web UI.
    Dev(dev::DevArgs),
    /// Run an edge node (config: `[edge]`, `[tls]`, `[tokens]`; see infra/config/edge.toml).
    Edge {
        /// TOML config file (values may be overridden by AMPHI__SECTION__KEY env vars).
        #[arg(long, env = "AMPHI_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run an origin (config: `[origin]`, `[tls]`).
    Origin {
        /// TOML config file.
        #[arg(long, env = "AMPHI_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a cdn-packager (config: `[packager]`, `[tls]`).
    Packager {
        /// TOML config file.
        #[arg(long, env = "AMPHI_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a geo-router (config: `[router]`, `[signing]`).
    GeoRouter {
        /// TOML config file.
        #[arg(long, env = "AMPHI_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Make signing keys and mint room tokens.
    Token(roles::TokenArgs),
    /// Make the mesh CA and role certificates (`amphi-role:` URI SANs).
    Cert(cert::CertArgs),
    /// Benchmarks (see BENCHMARKS.md).
    Bench(roles::BenchArgs),
    /// Load generators against a running mesh.
    #[command(subcommand)]
    Loadgen(LoadgenCommand),
    /// Capacity plan: fleet sizes and CDN egress for an audience (see docs/capacity.md).
    Plan(plan::PlanArgs),
}

/// `amphi loadgen ...`
#[derive(Subcommand)]
enum LoadgenCommand {
    /// N receive-only WebRTC (WHEP) subscribers against one edge while 3 speakers talk.
    Webrtc(loadgen_webrtc::WebrtcArgs),
    /// N LL-HLS players (blocking reloads + part fetches) against a packager it starts.
    Hls(loadgen_hls::HlsArgs),
    /// One big room (default 10,000 WebSocket + 200 WebRTC participants over two edges of an
    /// `amphi dev` child): joins, hands, promotions, kicks, chat, listener paging; fails on any
    /// origin link drop.
    Room(loadgen_room::RoomArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Edge { config } => roles::edge(config).await,
            Command::Origin { config } => roles::origin(config).await,
            Command::Packager { config } => roles::packager(config).await,
            Command::GeoRouter { config } => roles::geo_router(config).await,
            Command::Token(args) => roles::token(args),
            Command::Cert(args) => cert::run(args),
            Command::Bench(args) => roles::bench(args).await,
            Command::Loadgen(LoadgenCommand::Webrtc(args)) => loadgen_webrtc::loadgen(args).await,
            Command::Loadgen(LoadgenCommand::Hls(args)) => loadgen_hls::run(args).await,
            Command::Loadgen(LoadgenCommand::Room(args)) => loadgen_room::run(args).await,
            Command::Plan(args) => plan::run(args),
        }
    })
}
