//! `amphi`: one binary for every role of the live audio mesh, plus the all-in-one `dev` mesh.
//! Benchmarks, load generators and the capacity planner are `amphi-tools` (the `tools` crate).

mod cert;
mod config;
mod dev;
mod roles;
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
    Dev(Box<dev::DevArgs>),
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
            Command::Dev(args) => dev::run(*args).await,
            Command::Edge { config } => roles::edge(config).await,
            Command::Origin { config } => roles::origin(config).await,
            Command::Packager { config } => roles::packager(config).await,
            Command::GeoRouter { config } => roles::geo_router(config).await,
            Command::Token(args) => roles::token(args),
            Command::Cert(args) => cert::run(args),
        }
    })
}
