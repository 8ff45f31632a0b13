//! `amphi dev`: the whole mesh in one process on loopback, with embedded defaults.

use amphi_common::mtls::{DevPki, MeshRole};
use amphi_protocol::config::{
    known_region, EdgeConfig, EdgeEndpoint, OriginConfig, OriginEndpoint, PackagerConfig, Region,
    RouterConfig,
};
use amphi_protocol::token::TokenSigner;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinSet;

/// Options of `amphi dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where parts, segments, playlists and recordings go.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Regions, one edge each, in port order (built-in coordinates for AWS region names).
    #[arg(long, value_delimiter = ',', default_value = "us-east,eu-west")]
    regions: Vec<String>,
    /// Region for clients the router cannot place (default: the first region).
    #[arg(long)]
    default_region: Option<String>,
    /// Ed25519 signing key (PKCS#8 PEM, kid `dev-1`) for room tokens; a fresh one is made if absent.
    /// Lets `amphi token mint --key FILE --kid dev-1` mint tokens this mesh accepts.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// GeoIP City database (.mmdb; GeoIP2 or dbip schema); repeat for several files (e.g. dbip's
    /// IPv4 and IPv6 files). The first that knows an address answers.
    #[arg(long = "geoip", value_name = "FILE")]
    geoip: Vec<PathBuf>,
    /// Added to every dev port, so several meshes can run side by side (tests).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Media driver threads per edge (peers are spread over them on the edge's one UDP port).
    #[arg(long, default_value_t = 2)]
    media_threads: usize,
    /// Interactive (WebRTC) listeners per edge and per room before listeners are sent to the
    /// push tier (load tests raise it).
    #[arg(long, default_value_t = 500)]
    interactive_capacity: usize,
    /// Push listeners per edge and per room before listeners are sent to HLS (0: no push tier).
    #[arg(long, default_value_t = 10_000)]
    push_capacity: usize,
    /// A live room without speakers for this many seconds is ended (0: never).
    #[arg(long, default_value_t = 3600)]
    idle_room_timeout_secs: u64,
    /// Sessions one user may hold at once in one room (the origin refuses more joins).
    #[arg(long, default_value_t = 8)]
    max_sessions_per_user: usize,
    /// Seconds an edge session outlives its token's `exp` unless the client refreshed it.
    #[arg(long, default_value_t = 30)]
    token_expiry_grace_secs: u64,
    /// Store HLS output in this S3-compatible endpoint instead of `--data-dir` (e.g. s3s-fs
    /// on `http://127.0.0.1:9000`); keys from `AMPHI_DEV_S3_ACCESS_KEY`/`AMPHI_DEV_S3_SECRET_KEY`.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Bucket for `--s3-endpoint` (created if missing).
    #[arg(long, default_value = "amphi-hls")]
    s3_bucket: String,
    #[arg(
        long,
        env = "AMPHI_DEV_S3_ACCESS_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    /// Access key for `--s3-endpoint`.
    s3_access_key: String,
    #[arg(
        long,
        env = "AMPHI_DEV_S3_SECRET_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    /// Secret key for `--s3-endpoint`.
    s3_secret_key: String,
    /// Delete recordings this many hours after their room ended (default: keep).
    #[arg(long)]
    recording_retention_hours: Option<f64>,
    /// Recordings stay private (reachable only through the geo-router's signed URLs) until
    /// their host publishes them (`[packager.recording] private_until_published`).
    #[arg(long)]
    private_recordings: bool,
    /// POST the router's webhooks (signed with `--webhook-secret`) to this URL.
    #[arg(long)]
    webhook_url: Option<String>,
    /// Secret of the `--webhook-url` signatures.
    #[arg(long, default_value = "dev-webhook-secret")]
    webhook_secret: String,
    /// Keep the room directory, edge registry and room state in this Redis
    /// (`redis://127.0.0.1:6379/0`) instead of in memory.
    #[arg(long)]
    redis_url: Option<String>,
}

/// The fixed dev ports (before `--port-offset`).
struct Ports {
    router: u16,
    edge_http: u16,
    edge_media: u16,
    origin_quic: u16,
    origin_metrics: u16,
    packager_http: u16,
    packager_https: u16,
}

const DEV_PORTS: Ports = Ports {
    router: 8080,
    edge_http: 8101,
    edge_media: 8201,
    origin_quic: 8300,
    origin_metrics: 8301,
    packager_http: 8400,
    packager_https: 8401,
};

/// The largest `--port-offset` that keeps every dev port (the highest is the packager's 8400)
/// below Linux's default ephemeral range, which starts at 32768.
const MAX_PORT_OFFSET: u16 = 24_000;

const ORIGIN_NAME: &str = "origin.amphi.internal";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn addr(port: u16, offset: u16) -> SocketAddr {
    SocketAddr::new(LOOPBACK, port + offset)
}

fn url(port: u16, offset: u16) -> String {
    format!("http://127.0.0.1:{}", port + offset)
}

/// Ports Chromium refuses to fetch from (`ERR_UNSAFE_PORT`, its `kRestrictedPorts` list);
/// Firefox blocks the same ones.
const BROWSER_UNSAFE_PORTS: &[u16] = &[
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102,
    103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465,
    512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993,
    995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668,
    6669, 6679, 6697, 10080,
];

/// The HTTP listeners a browser talks to in a dev mesh of `edges` edges at `off`, by name.
fn browser_ports(off: u16, edges: usize) -> Vec<(String, u16)> {
    let mut ports = vec![
        (
            "the web client and API (geo-router)".to_string(),
            DEV_PORTS.router + off,
        ),
        (
            "the HLS packager".to_string(),
            DEV_PORTS.packager_http + off,
        ),
        (
            "the HLS packager (HTTPS)".to_string(),
            DEV_PORTS.packager_https + off,
        ),
    ];
    for i in 0..edges as u16 {
        ports.push((format!("edge {}", i + 1), DEV_PORTS.edge_http + i + off));
    }
    ports
}

/// Refuse an offset that puts a browser-facing listener on a port browsers block.
fn check_browser_ports(off: u16, edges: usize) -> Result<()> {
    for (what, port) in browser_ports(off, edges) {
        if BROWSER_UNSAFE_PORTS.contains(&port) {
            bail!(
                "--port-offset {off} would put {what} on port {port}, which browsers refuse to                  load (Chromium: ERR_UNSAFE_PORT); choose another offset, e.g. {}",
                off + 100
            );
        }
    }
    Ok(())
}

/// Run the dev mesh until Ctrl-C.
pub async fn run(args: DevArgs) -> Result<()> {
    let off = args.port_offset;
    if off > MAX_PORT_OFFSET {
        bail!(
            "--port-offset {off} would put dev ports into the kernel's ephemeral port range \
             (32768 and up), where outgoing connections take ports at random; use at most \
             {MAX_PORT_OFFSET}"
        );
    }
    let regions: Vec<Region> = args
        .regions
        .iter()
        .map(|r| known_region(r).with_context(|| format!("unknown region {r}")))
        .collect::<Result<_>>()?;
    if regions.is_empty() || regions.len() > 32 {
        bail!("--regions takes 1 to 32 regions");
    }
    check_browser_ports(off, regions.len())?;
    let default_region = args
        .default_region
        .clone()
        .unwrap_or_else(|| regions[0].name.clone());
    if !regions.iter().any(|r| r.name == default_region) {
        bail!("default region {default_region} is not among --regions");
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;

    let pki = DevPki::generate()?;
    let signer = match &args.signing_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            TokenSigner::from_pkcs8_pem("dev-1", &pem)?
        }
        None => TokenSigner::generate("dev-1"),
    };
    let verifier = signer.verifier();
    let shutdown = crate::roles::shutdown_on_signal();
    let mut tasks: JoinSet<(String, Result<()>)> = JoinSet::new();

    let origin = amphi_origin::OriginSetup {
        config: OriginConfig {
            id: "origin-1".into(),
            quic_listen: addr(DEV_PORTS.origin_quic, off),
            metrics_listen: addr(DEV_PORTS.origin_metrics, off),
            idle_room_timeout_secs: args.idle_room_timeout_secs,
            max_sessions_per_user: args.max_sessions_per_user,
        },
        mesh_tls: pki.issue(ORIGIN_NAME, MeshRole::Origin)?,
    };
    let sd = shutdown.clone();
    let origin_options = amphi_origin::OriginOptions {
        redis_url: args.redis_url.clone(),
    };
    tasks.spawn(async move {
        let r = amphi_origin::run_with(origin, origin_options, sd).await;
        ("origin".into(), r.map_err(Into::into))
    });

    let origins = vec![OriginEndpoint {
        id: "origin-1".into(),
        addr: addr(DEV_PORTS.origin_quic, off),
        server_name: ORIGIN_NAME.into(),
    }];
    let packager = amphi_packager::PackagerSetup {
        config: PackagerConfig {
            id: "packager-1".into(),
            origins: origins.clone(),
            origin_addr: None,
            origin_server_name: None,
            http_listen: addr(DEV_PORTS.packager_http, off),
            data_dir: args.data_dir.clone(),
            limits: Default::default(),
        },
        options: amphi_packager::PackagerOptions {
            storage: match &args.s3_endpoint {
                Some(endpoint) => amphi_packager::StorageConfig {
                    backend: amphi_packager::Backend::S3,
                    bucket: args.s3_bucket.clone(),
                    endpoint: Some(endpoint.clone()),
                    region: Some("us-east-1".into()),
                    path_style: true,
                    access_key: Some(args.s3_access_key.clone()),
                    secret_key: Some(args.s3_secret_key.clone()),
                    ..Default::default()
                },
                None => Default::default(),
            },
            recording: amphi_packager::RecordingConfig {
                retention_hours: args.recording_retention_hours,
                sweep_interval_secs: Some(60),
                private_until_published: Some(args.private_recordings),
            },
            tls_listen: Some(addr(DEV_PORTS.packager_https, off)),
            tls_cert: None,
            tls_key: None,
            http1_fast_path: None,
        },
        mesh_tls: pki.issue("packager-1.amphi.internal", MeshRole::Packager)?,
        tokens: verifier.clone(),
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        let r = amphi_packager::run(packager, sd).await;
        ("packager".into(), r.map_err(Into::into))
    });

    let mut endpoints = Vec::new();
    let mut table = Vec::new();
    for (i, region) in regions.iter().enumerate() {
        let i16 = i as u16;
        let id = format!("edge-{}", region.name);
        let public_url = url(DEV_PORTS.edge_http + i16, off);
        let media = addr(DEV_PORTS.edge_media + i16, off);
        let setup = amphi_edge::EdgeSetup {
            config: EdgeConfig {
                id: id.clone(),
                region: region.name.clone(),
                index: (i + 1) as u16,
                http_listen: addr(DEV_PORTS.edge_http + i16, off),
                public_url: public_url.clone(),
                relay_url: Some(public_url.clone()),
                relay_server_name: None,
                // Push over WebTransport on the HTTP port's UDP twin, with the edge's own
                // short-lived certificate.
                webtransport: Some(amphi_protocol::config::WebTransportConfig {
                    listen: addr(DEV_PORTS.edge_http + i16, off),
                    public_url: None,
                    cert: None,
                    key: None,
                }),
                media_listen: media,
                media_public: None,
                origins: origins.clone(),
                origin_addr: None,
                origin_server_name: None,
                router_url: url(DEV_PORTS.router, off),
                interactive_capacity: args.interactive_capacity,
                media_threads: args.media_threads,
                https: Default::default(),
                limits: Default::default(),
                ice_connect_timeout_secs: 15,
                max_token_lifetime_secs: amphi_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
                token_expiry_grace_secs: args.token_expiry_grace_secs,
            },
            mesh_tls: pki.issue(&format!("{id}.amphi.internal"), MeshRole::Edge)?,
            tokens: verifier.clone(),
        };
        let sd = shutdown.clone();
        let name = id.clone();
        tasks.spawn(async move {
            // Registers with the geo-router; drains when an operator asks (never exits on it).
            let registration = amphi_edge::registration::RegistrationOptions::default();
            let r = amphi_edge::run_with(setup, Some(registration), Default::default(), sd).await;
            (name, r.map_err(Into::into))
        });
        table.push((
            format!("edge {} ({})", region.name, id),
            format!("{public_url}  (WebRTC udp {media})"),
        ));
        endpoints.push(EdgeEndpoint {
            id,
            region: region.clone(),
            public_url,
        });
    }

    let router = amphi_geo_router::RouterSetup {
        config: RouterConfig {
            http_listen: addr(DEV_PORTS.router, off),
            public_url: url(DEV_PORTS.router, off),
            default_region: default_region.clone(),
            edges: endpoints,
            packager_url: url(DEV_PORTS.packager_http, off),
            dev_mode: true,
            token_ttl_secs: 6 * 3600,
            max_token_lifetime_secs: amphi_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
            id: "geo-router-1".into(),
            origins,
            geoip: args.geoip.clone(),
            trusted_proxies: vec![],
            load_threshold: 0.8,
            interactive_capacity: u32::try_from(args.interactive_capacity).unwrap_or(u32::MAX),
            room_affine: true,
            relay_fanout: 10,
            push_capacity: u32::try_from(args.push_capacity).unwrap_or(u32::MAX),
            api_keys: vec![],
            webhooks: args
                .webhook_url
                .iter()
                .map(|url| amphi_protocol::config::WebhookConfig {
                    url: url.clone(),
                    secret: args.webhook_secret.clone(),
                })
                .collect(),
            room_idle_timeout_secs: 21_600,
            reminder_lead_secs: 600,
            redis_url: args.redis_url.clone(),
            hls_base_url: None,
            http1_fast_path: true,
            https: Default::default(),
            limits: Default::default(),
        },
        signer,
        web: crate::web::assets(),
        mesh_tls: Some(pki.issue("geo-router-1.amphi.internal", MeshRole::Router)?),
    };
    let sd = shutdown.clone();
    tasks.spawn(async move {
        let r = amphi_geo_router::run(router, sd).await;
        ("geo-router".into(), r.map_err(Into::into))
    });

    let router_url = url(DEV_PORTS.router, off);
    println!("amphi dev mesh (default region {default_region}); Ctrl-C to stop");
    println!("  {:<28} {router_url}/", "web client");
    println!("  {:<28} {router_url}/v1/rooms", "REST API (geo-router)");
    println!("  {:<28} {router_url}/hls/{{room}}/index.m3u8", "HLS");
    for (name, value) in &table {
        println!("  {name:<28} {value}");
    }
    println!(
        "  {:<28} quic 127.0.0.1:{}  (metrics {})",
        "origin",
        DEV_PORTS.origin_quic + off,
        url(DEV_PORTS.origin_metrics, off)
    );
    println!(
        "  {:<28} {}  https://127.0.0.1:{} (HTTP/2)  (data in {})",
        "packager",
        url(DEV_PORTS.packager_http, off),
        DEV_PORTS.packager_https + off,
        args.data_dir.display()
    );

    // Run until Ctrl-C, or until any component fails (then stop the rest).
    let mut failure = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(done) = tasks.join_next() => {
            let (name, result) = done.context("component task panicked")?;
            failure = Some(match result {
                Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Err(e) => e.context(format!("{name} failed")),
            });
            shutdown.cancel();
        }
    }
    let drain = async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((name, Err(e))) = done {
                tracing::warn!(component = %name, error = %format!("{e:#}"), "stopped with error");
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("components did not stop within 5 s");
    }
    match failure {
        Some(e) => Err(e),
        None => {
            println!("amphi dev stopped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_onto_browser_blocked_ports_are_refused() {
        // 8080 + 2000 = 10080: the web client itself.
        let e = check_browser_ports(2000, 3).unwrap_err().to_string();
        assert!(e.contains("web client") && e.contains("10080"), "{e}");
        assert!(e.contains("ERR_UNSAFE_PORT"), "{e}");
        // An edge (8101 + 2 + 1977) and the packager (8400 + 1680).
        assert!(check_browser_ports(1977, 3)
            .unwrap_err()
            .to_string()
            .contains("edge 3"));
        assert!(check_browser_ports(1977, 2).is_ok(), "only two edges");
        assert!(check_browser_ports(1680, 1)
            .unwrap_err()
            .to_string()
            .contains("HLS packager"));
        for off in [0, 1000, 2100, 10_000, MAX_PORT_OFFSET] {
            assert!(check_browser_ports(off, 32).is_ok(), "{off}");
        }
        // The suggested offset is itself fine.
        assert!(check_browser_ports(2100, 3).is_ok());
    }
}
