//! The namespace test bed: its hosts (one network namespace each, one address each), the link
//! emulator's regions, and every role's config rendered from the Terraform templates
//! (`terraform/modules/*/templates/*.toml.tftpl`, with the `@...@` values the user-data script
//! fills in at boot, by [`crate::tfrender`]), with nothing on top: no `AMPHI__*` variable.
//! Every HTTP listener serves TLS with a certificate of the bed's CA that names the host's
//! address.

use crate::tfrender::{render_role_config, BootValues, TfRole};
use amphi_common::mtls::{DevPki, MeshRole};
use amphi_protocol::token::TokenSigner;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The regions of the bed, in address order (`10.77.{1,2,3}.0/24`).
pub const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-1"];

/// Round-trip times between the regions, ms.
pub const RTT_MS: [(&str, &str, f64); 3] = [
    ("us-east-1", "eu-west-1", 75.0),
    ("us-east-1", "ap-southeast-1", 220.0),
    ("eu-west-1", "ap-southeast-1", 160.0),
];

/// TLS server name of every origin's mesh certificate.
pub const ORIGIN_SERVER_NAME: &str = "origin.amphi.internal";
/// The name every edge's certificate carries (the Terraform module's `tls_server_name`): relay
/// feeds between edges check it.
pub const EDGE_SERVER_NAME: &str = "edge.amphi.internal";
/// The bed's API key id (the router's `api_keys`, edges sign heartbeats with it).
pub const API_KEY_ID: &str = "bed";
/// Where the router's GeoIP database is on a node (terraform/modules/geo-router with a
/// `geoip_object_key`); in the bed, under the router host's state directory.
pub const GEOIP_PATH: &str = "/var/lib/amphi/geoip/city.mmdb";
/// The bed's S3 credentials and bucket.
pub const S3_KEYS: (&str, &str, &str) = ("bedaccess", "bedsecret0123456789", "amphi-hls");

/// What runs on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `amphi geo-router`.
    Router,
    /// `amphi origin`.
    Origin,
    /// `amphi packager`.
    Packager,
    /// `amphi edge`.
    Edge,
    /// redis-server.
    Redis,
    /// s3s-fs.
    S3,
    /// A client namespace (nothing started; test clients run here).
    Client,
}

impl Kind {
    /// Name used in `hosts.tsv` and by `scripts/mesh.sh`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Router => "geo-router",
            Kind::Origin => "origin",
            Kind::Packager => "packager",
            Kind::Edge => "edge",
            Kind::Redis => "redis",
            Kind::S3 => "s3",
            Kind::Client => "client",
        }
    }
}

/// One host of the bed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Short name (namespace `{prefix}{name}`, see [`netns_prefix`]).
    pub name: &'static str,
    /// Region index into [`REGIONS`].
    pub region: usize,
    /// Host number inside the region (its /30 is `10.77.{region+1}.{4n}`).
    pub n: u8,
    /// What runs there.
    pub kind: Kind,
}

impl Host {
    /// The host's address.
    pub fn addr(&self) -> String {
        format!("10.77.{}.{}", self.region + 1, 4 * self.n + 2)
    }

    /// The core router's address on the host's link (its default gateway).
    pub fn gateway(&self) -> String {
        format!("10.77.{}.{}", self.region + 1, 4 * self.n + 1)
    }

    /// The host's /30.
    pub fn net(&self) -> String {
        format!("10.77.{}.{}/30", self.region + 1, 4 * self.n)
    }

    /// Network namespace name.
    pub fn netns(&self) -> String {
        format!("{}{}", netns_prefix(), self.name)
    }
}

/// Prefix of the bed's namespace names: `AMPHI_MESH_PREFIX` (as `scripts/mesh.sh` reads it),
/// default `amb-`; beds with different prefixes can run side by side.
pub fn netns_prefix() -> String {
    std::env::var("AMPHI_MESH_PREFIX")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "amb-".to_string())
}

/// Every host: a geo-router, two origins, a packager, Redis and S3 in us-east-1; two edges in
/// us-east-1 and one each in eu-west-1 and ap-southeast-1; one client namespace per region.
pub fn hosts() -> Vec<Host> {
    let h = |name, region, n, kind| Host {
        name,
        region,
        n,
        kind,
    };
    vec![
        h("router", 0, 1, Kind::Router),
        h("origin-1", 0, 2, Kind::Origin),
        h("origin-2", 0, 3, Kind::Origin),
        h("packager", 0, 4, Kind::Packager),
        h("redis", 0, 5, Kind::Redis),
        h("s3", 0, 6, Kind::S3),
        h("edge-use1-a", 0, 7, Kind::Edge),
        h("edge-use1-b", 0, 8, Kind::Edge),
        h("client-use1", 0, 9, Kind::Client),
        h("edge-euw1", 1, 1, Kind::Edge),
        h("client-euw1", 1, 2, Kind::Client),
        h("edge-aps1", 2, 1, Kind::Edge),
        h("client-aps1", 2, 2, Kind::Client),
    ]
}

fn host(name: &str) -> Host {
    hosts()
        .into_iter()
        .find(|h| h.name == name)
        .expect("a host of the plan")
}

/// `hosts.tsv` for `scripts/mesh.sh`: name, netns, kind, region, address, gateway, net.
pub fn hosts_tsv() -> String {
    let mut out = String::new();
    for h in hosts() {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            h.name,
            h.netns(),
            h.kind.name(),
            REGIONS[h.region],
            h.addr(),
            h.gateway(),
            h.net()
        );
    }
    out
}

/// The emulator config: regions, RTTs, and (when `partition_eu_from_origins`) a partition
/// between eu-west-1 and both origins.
pub fn netem_toml(partition_eu_from_origins: bool) -> String {
    let mut out = String::from("# amphi-netem config of the test bed (written by amphi-tools bed-setup / netem-config)\nseed = 1\ninside_rtt_ms = 1.0\n");
    for (i, r) in REGIONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n[[regions]]\nname = \"{r}\"\nnets = [\"10.77.{}.0/24\"]",
            i + 1
        );
    }
    for (a, b, rtt) in RTT_MS {
        let _ = writeln!(
            out,
            "\n[[links]]\na = \"{a}\"\nb = \"{b}\"\nrtt_ms = {rtt:.1}"
        );
    }
    if partition_eu_from_origins {
        let _ = writeln!(
            out,
            "\n[[partitions]]\na = [\"10.77.2.0/24\"]\nb = [\"{}\", \"{}\"]",
            host("origin-1").net(),
            host("origin-2").net()
        );
    }
    out
}

/// The emulator's `[[impairments]]` for lossy paths (issue 11, fault 4): 5 % loss and 30 ms
/// jitter on the us-east-1 edges' relay links to the origins and on the us-east-1 client
/// namespace's link to those edges (a speaker's uplink); appended to [`netem_toml`].
pub fn lossy_paths_toml() -> String {
    let nets = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("\"{}\"", host(n).net()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let edges = nets(&["edge-use1-a", "edge-use1-b"]);
    let mut out = String::new();
    for other in [nets(&["origin-1", "origin-2"]), nets(&["client-use1"])] {
        let _ = writeln!(
            out,
            "\n[[impairments]]\na = [{edges}]\nb = [{other}]\nloss_percent = 5.0\njitter_ms = 30.0"
        );
    }
    out
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The geo-router's HTTPS port (edges listen on the same port on their hosts).
pub const HTTP_PORT: u16 = 8080;
/// The packager's HTTPS port (its plain HTTP listener is on 8400).
pub const PACKAGER_HTTPS_PORT: u16 = 8443;

/// The geo-router's base URL inside the bed.
pub fn router_url() -> String {
    format!("https://{}:{HTTP_PORT}", host("router").addr())
}

/// The Terraform role of a host kind, if a module deploys it.
fn tf_role(kind: Kind) -> Option<TfRole> {
    match kind {
        Kind::Router => Some(TfRole::Router),
        Kind::Origin => Some(TfRole::Origin),
        Kind::Packager => Some(TfRole::Packager),
        Kind::Edge => Some(TfRole::Edge),
        Kind::Redis | Kind::S3 | Kind::Client => None,
    }
}

/// Make the run directory: `hosts.tsv`, `netem.toml`, the bed's PKI (`ca.pem`) and token key,
/// and for each role host `config.toml`, rendered from its Terraform template with the values a
/// deployment passes (`api_secret` as the `API_KEY_SECRET` secret, the s3s-fs keys as
/// `S3_ACCESS_KEY` / `S3_SECRET_KEY`) and nothing else.
pub fn setup(repo: &Path, run: &Path, api_secret: &str) -> Result<()> {
    std::fs::create_dir_all(run)?;
    write(&run.join("hosts.tsv"), &hosts_tsv())?;
    write(&run.join("netem.toml"), &netem_toml(false))?;
    let pki = DevPki::generate()?;
    let signer = TokenSigner::generate("k1");
    let redis = host("redis");
    let s3 = host("s3");
    let packager = host("packager");
    let origins: Vec<Host> = hosts()
        .into_iter()
        .filter(|h| h.kind == Kind::Origin)
        .collect();
    let origin_list: Vec<Value> = origins
        .iter()
        .map(|o| {
            json!({
                "id": o.name, "addr": format!("{}:4433", o.addr()),
                "server_name": ORIGIN_SERVER_NAME,
            })
        })
        .collect();
    let router_url = router_url();
    let mut edge_number = 0u8;
    for h in hosts() {
        let Some(role) = tf_role(h.kind) else {
            continue;
        };
        let dir = run.join(h.name);
        let vars = match h.kind {
            Kind::Router => json!({
                "region": REGIONS[h.region], "http_port": HTTP_PORT, "public_url": router_url,
                "default_region": REGIONS[0],
                "packager_url": format!("https://{}:{PACKAGER_HTTPS_PORT}", packager.addr()),
                // Listeners fetch HLS through the router's /hls proxy (no CDN in the bed).
                "hls_base_url": router_url,
                "token_ttl_secs": 3600, "signing_kid": "k1",
                "trusted_proxies": ["10.77.0.0/16"],
                "redis_url": format!("redis://{}:6379/0", redis.addr()),
                "api_key_id": API_KEY_ID,
                // Edges register themselves; no static region entries.
                "edges": [], "coordinates": {},
                "origins": origin_list,
                // What the module passes with a geoip_object_key (user data installs it there;
                // `mesh.sh up` writes the test database to that path under the host's state dir).
                "geoip": [GEOIP_PATH],
            }),
            Kind::Origin => json!({"id": h.name, "quic_port": 4433, "metrics_port": 9300,
                "idle_room_timeout_secs": 3600,
                "redis_url": format!("redis://{}:6379/1", redis.addr())}),
            // One packager set taking every origin (terraform/modules/packager), so a room
            // whose origin dies keeps its HLS; storage in s3s-fs with static keys.
            Kind::Packager => json!({"id": "packager-1", "origins": origin_list,
                "http_port": 8400, "https_port": PACKAGER_HTTPS_PORT,
                "storage_bucket": S3_KEYS.2, "storage_region": REGIONS[0],
                "storage_endpoint": format!("http://{}:9000", s3.addr()),
                "storage_static_keys": true,
                // The router's recording grants (private recordings, publish and delete).
                "token_public_keys": [{"kid": "k1", "pem": signer.public_pem()}]}),
            Kind::Edge => {
                edge_number += 1;
                json!({
                    "region": REGIONS[h.region], "http_port": HTTP_PORT, "media_port": 3478,
                    "webtransport_port": 4433, "tls_server_name": EDGE_SERVER_NAME,
                    "public_url": format!("https://{}:{HTTP_PORT}", h.addr()),
                    "origins": origin_list,
                    "router_url": router_url, "interactive_capacity": 500,
                    "media_threads": 0, "ice_connect_timeout_secs": 15,
                    "backend_tls": true, "capacity": 500, "api_key_id": API_KEY_ID,
                    "drain_grace_secs": 5, "vpc_cidr": "10.77.0.0/16",
                    "token_public_keys": [{"kid": "k1", "pem": signer.public_pem()}],
                })
            }
            Kind::Redis | Kind::S3 | Kind::Client => continue,
        };
        let boot = BootValues {
            // Edge ids are "edge-{region}-{instance}": the instance is the host's letter.
            instance_id: match h.kind {
                Kind::Edge => h.name.rsplit('-').next().unwrap_or(h.name).to_string(),
                _ => h.name.to_string(),
            },
            private_ipv4: h.addr(),
            // The bed has no public addresses.
            public_ipv4: h.addr(),
            node_number: edge_number,
            secrets: BTreeMap::from([
                ("API_KEY_SECRET".to_string(), api_secret.to_string()),
                ("S3_ACCESS_KEY".to_string(), S3_KEYS.0.to_string()),
                ("S3_SECRET_KEY".to_string(), S3_KEYS.1.to_string()),
            ]),
            etc_dir: Some(dir.join("etc")),
            state_dir: Some(dir.join("var")),
            bind_ip: None,
        };
        let config = render_role_config(repo, role, &vars, &boot)
            .map_err(|e| anyhow::anyhow!("{}: {e}", h.name))?;
        write(&dir.join("config.toml"), &config)?;
        // The origins' QUIC server name and the address every HTTPS client dials.
        let mut names = vec![h.addr()];
        if h.kind == Kind::Origin {
            names.push(ORIGIN_SERVER_NAME.to_string());
        }
        if h.kind == Kind::Edge {
            names.push(EDGE_SERVER_NAME.to_string());
        }
        names.push(format!("{}.amphi.internal", h.name));
        // The mesh role the host's certificate allows (none for hosts outside the mesh).
        let roles: &[MeshRole] = match h.kind {
            Kind::Origin => &[MeshRole::Origin],
            Kind::Edge => &[MeshRole::Edge],
            Kind::Packager => &[MeshRole::Packager],
            Kind::Router => &[MeshRole::Router],
            Kind::Redis | Kind::S3 | Kind::Client => &[],
        };
        let issued = pki.issue_pem_for(&names, roles)?;
        write(&dir.join("etc/tls/ca.pem"), &issued.ca)?;
        write(&dir.join("etc/tls/cert.pem"), &issued.cert)?;
        write(&dir.join("etc/tls/key.pem"), &issued.key)?;
        if h.kind == Kind::Router {
            write(&dir.join("etc/signing.pem"), &signer.to_pkcs8_pem())?;
        }
        std::fs::create_dir_all(dir.join("var/data"))?;
    }
    write(&run.join("ca.pem"), &pki.ca_pem())?;
    write(&run.join("signing.pem"), &signer.to_pkcs8_pem())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_have_distinct_addresses_in_their_region() {
        let hs = hosts();
        for (i, a) in hs.iter().enumerate() {
            assert!(a.addr().starts_with(&format!("10.77.{}.", a.region + 1)));
            assert!(a.netns().len() <= 32);
            for b in &hs[i + 1..] {
                assert_ne!(a.addr(), b.addr());
                assert_ne!(a.name, b.name);
            }
        }
        assert_eq!(hs.iter().filter(|h| h.kind == Kind::Edge).count(), 4);
    }

    #[test]
    fn lossy_paths_parse_and_impair_the_relay_and_the_uplink() {
        let text = netem_toml(false) + &lossy_paths_toml();
        let f: crate::netem::NetemFile = toml::from_str(&text).unwrap();
        assert_eq!(f.impairments.len(), 2);
        assert_eq!(f.impairments[0].a, ["10.77.1.28/30", "10.77.1.32/30"]);
        assert_eq!(f.impairments[0].b, ["10.77.1.8/30", "10.77.1.12/30"]);
        assert_eq!(f.impairments[1].b, ["10.77.1.36/30"]);
        crate::netem::Emulator::new(&f).unwrap();
    }

    #[test]
    fn netem_config_parses_and_partitions_only_on_request() {
        for p in [false, true] {
            let f: crate::netem::NetemFile = toml::from_str(&netem_toml(p)).unwrap();
            assert_eq!(f.regions.len(), 3);
            assert_eq!(f.links.len(), 3);
            assert_eq!(f.partitions.len(), usize::from(p));
            crate::netem::Emulator::new(&f).unwrap();
        }
    }

    #[test]
    fn every_role_config_renders_from_the_terraform_templates() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let run = std::env::temp_dir().join(format!("amb-setup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        setup(repo, &run, "s3cret").unwrap();
        let edge = std::fs::read_to_string(run.join("edge-euw1/config.toml")).unwrap();
        assert!(edge.contains("id = \"edge-eu-west-1-euw1\""), "{edge}");
        assert!(edge.contains("media_public = \"10.77.2.6:3478\""), "{edge}");
        assert!(edge.contains(&format!("{}/edge-euw1/etc/tls/ca.pem", run.display())));
        let keys: String = edge.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!keys.contains('@'), "{edge}");
        let router = std::fs::read_to_string(run.join("router/config.toml")).unwrap();
        // Everything a role needs is in its rendered file: no overlays.
        assert!(!run.join("router/env").exists());
        assert!(router.contains(&format!("{}/router/var/geoip/city.mmdb", run.display())));
        let packager = std::fs::read_to_string(run.join("packager/config.toml")).unwrap();
        assert!(packager.contains("backend = \"s3\""), "{packager}");
        assert!(
            packager.contains("secret_key = \"bedsecret0123456789\""),
            "{packager}"
        );
        assert!(packager.contains("id = \"origin-2\""), "{packager}");
        let origin = std::fs::read_to_string(run.join("origin-1/config.toml")).unwrap();
        assert!(
            origin.contains("redis_url = \"redis://10.77.1.22:6379/1\""),
            "{origin}"
        );
        assert!(router.contains("[[router.origins]]"), "{router}");
        assert!(router.contains("secret = \"s3cret\""), "{router}");
        assert!(router.contains("tls_cert = "), "{router}");
        assert!(
            edge.contains("router_url = \"https://10.77.1.6:8080\""),
            "{edge}"
        );
        assert!(edge.contains("api_key_secret = \"s3cret\""), "{edge}");
        assert!(run.join("ca.pem").exists());
        for h in ["router", "origin-1", "origin-2", "packager", "edge-use1-a"] {
            let text = std::fs::read_to_string(run.join(h).join("config.toml")).unwrap();
            text.parse::<toml::Table>().unwrap();
            assert!(run.join(h).join("etc/tls/key.pem").exists());
        }
        std::fs::remove_dir_all(&run).unwrap();
    }
}
