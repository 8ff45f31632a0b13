//! The deployment configs load through the very loader `amphi <role> --config FILE` uses: the
//! documented examples in `infra/config/` and the configs the Terraform modules render into user
//! data (`terraform/modules/*/templates/*.toml.tftpl`, rendered here with hcl-rs). Keys a role
//! does not know would be silently ignored by serde, so each file's keys are also checked against
//! the config types.

use super::{EdgeFile, OriginFile, PackagerFile, RouterFile};
use crate::config;
use amphi_protocol::config::{EdgeConfig, OriginConfig, PackagerConfig, RouterConfig, TlsFiles};
use amphi_protocol::token::TokenVerifier;
use hcl::eval::{Context, Evaluate, FuncArgs, FuncDef, ParamType};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_table(path: &Path) -> toml::Table {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every key of `file` (recursively, through tables and arrays of tables) exists in `known`, the
/// same section deserialized and serialized back: a misspelt or stale key fails here.
fn assert_keys_known(file: &toml::Value, known: &toml::Value, at: &str) {
    match (file, known) {
        (toml::Value::Table(f), toml::Value::Table(k)) => {
            for (key, v) in f {
                let Some(kv) = k.get(key) else {
                    panic!("{at}.{key} is not a config key of this role");
                };
                assert_keys_known(v, kv, &format!("{at}.{key}"));
            }
        }
        (toml::Value::Array(f), toml::Value::Array(k)) => {
            assert_eq!(f.len(), k.len(), "{at}");
            for (i, (fv, kv)) in f.iter().zip(k).enumerate() {
                assert_keys_known(fv, kv, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

/// Deserialize section `name` as the protocol config type `T` and check its keys against it.
fn section<T: Serialize + DeserializeOwned>(table: &toml::Table, name: &str) {
    let file = table
        .get(name)
        .unwrap_or_else(|| panic!("no [{name}] section"));
    let parsed: T = file
        .clone()
        .try_into()
        .unwrap_or_else(|e| panic!("[{name}]: {e}"));
    let known = toml::Value::try_from(&parsed).unwrap();
    assert_keys_known(file, &known, name);
}

fn only_sections(table: &toml::Table, allowed: &[&str]) {
    for key in table.keys() {
        assert!(allowed.contains(&key.as_str()), "unknown section [{key}]");
    }
}

/// Load `path` as `amphi <role>` would, and check its keys; returns what was loaded.
fn check_edge(path: &Path) -> EdgeFile {
    let file: EdgeFile = config::load(Some(path)).unwrap();
    let table = read_table(path);
    only_sections(&table, &["edge", "tls", "tokens"]);
    section::<EdgeConfig>(&table, "edge");
    section::<TlsFiles>(&table, "tls");
    let keys = table["tokens"]["public_keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        for key in k.as_table().unwrap().keys() {
            assert!(key == "kid" || key == "pem", "tokens.public_keys.{key}");
        }
    }
    // The keys are real Ed25519 public keys, as the edge checks them at start.
    let mut verifier = TokenVerifier::default();
    for k in &file.tokens.public_keys {
        verifier.add_public_pem(k.kid.clone(), &k.pem).unwrap();
    }
    file
}

fn check_origin(path: &Path) -> OriginFile {
    let file: OriginFile = config::load(Some(path)).unwrap();
    let table = read_table(path);
    only_sections(&table, &["origin", "tls"]);
    section::<OriginConfig>(&table, "origin");
    section::<TlsFiles>(&table, "tls");
    file
}

fn check_packager(path: &Path) {
    let _: PackagerFile = config::load(Some(path)).unwrap();
    let mut table = read_table(path);
    only_sections(&table, &["packager", "tls"]);
    // `[packager]` holds the protocol's PackagerConfig and amphi-packager's optional keys
    // (PackagerOptions: storage, recording, tls_*): check each against its own type.
    let mut options = toml::Table::new();
    if let Some(p) = table.get_mut("packager").and_then(|p| p.as_table_mut()) {
        let optional: Vec<String> = p
            .keys()
            .filter(|k| {
                matches!(
                    k.as_str(),
                    "storage"
                        | "recording"
                        | "tls_listen"
                        | "tls_cert"
                        | "tls_key"
                        | "http1_fast_path"
                )
            })
            .cloned()
            .collect();
        for k in optional {
            if let Some(v) = p.remove(&k) {
                options.insert(k, v);
            }
        }
    }
    section::<PackagerConfig>(&table, "packager");
    let mut optional = toml::Table::new();
    optional.insert("packager".into(), toml::Value::Table(options));
    section::<amphi_packager::PackagerOptions>(&optional, "packager");
    section::<TlsFiles>(&table, "tls");
}

fn check_router(path: &Path) -> RouterFile {
    let file: RouterFile = config::load(Some(path)).unwrap();
    let table = read_table(path);
    only_sections(&table, &["router", "signing", "tls"]);
    section::<RouterConfig>(&table, "router");
    if table.contains_key("tls") {
        section::<TlsFiles>(&table, "tls");
    }
    for key in table["signing"].as_table().unwrap().keys() {
        assert!(key == "kid" || key == "key_file", "signing.{key}");
    }
    assert!(!file.signing.kid.is_empty());
    file
}

#[test]
fn infra_example_configs_load_with_every_key_known() {
    let dir = repo().join("infra/config");
    let edge = check_edge(&dir.join("edge.toml"));
    assert_eq!(edge.edge.region, "eu-west-1");
    assert!(edge.edge.media_public.is_some());
    check_origin(&dir.join("origin.toml"));
    check_packager(&dir.join("packager.toml"));
    let router = check_router(&dir.join("geo-router.toml"));
    assert_eq!(router.router.edges.len(), 2);
    assert!(!router.router.dev_mode);
}

#[test]
fn infra_example_configs_document_every_key() {
    // Each key line is preceded by a comment line (or shares one with the keys of its table).
    for name in ["edge", "origin", "packager", "geo-router"] {
        let path = repo().join(format!("infra/config/{name}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut documented = 0;
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            let is_key = !t.is_empty()
                && !t.starts_with('#')
                && !t.starts_with('[')
                && !t.starts_with('-')
                && !t.starts_with('"')
                && t.contains(" = ");
            if !is_key || (i > 0 && lines[i - 1].trim().ends_with("\"\"\"")) {
                continue;
            }
            // Repeated [[router.edges]] entries are documented by their first occurrence.
            let key = t.split(" = ").next().unwrap();
            let first = lines
                .iter()
                .position(|l| l.trim().starts_with(&format!("{key} = ")))
                .unwrap();
            assert!(
                lines[first - 1].trim_start().starts_with('#'),
                "{}: key `{key}` has no comment above it",
                path.display()
            );
            documented += 1;
        }
        assert!(documented >= 3, "{}: {documented} keys", path.display());
    }
}

fn trimspace(args: FuncArgs) -> Result<hcl::Value, String> {
    match &args[0] {
        hcl::Value::String(s) => Ok(hcl::Value::from(s.trim())),
        other => Err(format!("trimspace: not a string: {other:?}")),
    }
}

/// Render a Terraform template with hcl-rs and fill in the `@...@` values user data sets at boot.
fn render(template: &Path, vars: serde_json::Value) -> String {
    let text = std::fs::read_to_string(template).unwrap();
    let parsed: hcl::Template = text.parse().unwrap();
    let mut ctx = Context::new();
    for (k, v) in vars.as_object().unwrap() {
        ctx.declare_var(k.as_str(), hcl::to_value(v).unwrap());
    }
    ctx.declare_func(
        "trimspace",
        FuncDef::builder().param(ParamType::String).build(trimspace),
    );
    parsed
        .evaluate(&ctx)
        .unwrap_or_else(|e| panic!("{}: {e}", template.display()))
        .replace("@INSTANCE_ID@", "i-0123456789abcdef0")
        .replace("@PRIVATE_IPV4@", "10.30.1.7")
        .replace("@PUBLIC_IPV4@", "198.51.100.20")
        .replace("@NODE_NUMBER@", "103")
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("amphi-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn example_public_key() -> String {
    let t = read_table(&repo().join("infra/config/edge.toml"));
    t["tokens"]["public_keys"][0]["pem"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn terraform_rendered_configs_load_with_every_key_known() {
    let modules = repo().join("terraform/modules");
    let origin = serde_json::json!({"id": "origin-1", "addr": "203.0.113.10:4433",
        "server_name": "origin.amphi.internal"});

    let edge = render(
        &modules.join("edge-region/templates/edge.toml.tftpl"),
        serde_json::json!({
            "region": "eu-west-1", "http_port": 8080, "media_port": 3478,
            "public_url": "https://edge-eu-west-1.example.com",
            "origin_addr": "203.0.113.10:4433", "origin_server_name": "origin.amphi.internal",
            "router_url": "https://api.example.com",
            "interactive_capacity": 300,
            "token_public_keys": [
                {"kid": "k1", "pem": example_public_key()},
                {"kid": "k0", "pem": example_public_key()},
            ],
        }),
    );
    let e = check_edge(&write_temp("edge.toml", &edge));
    assert_eq!(e.edge.index, 103);
    assert_eq!(e.edge.id, "edge-eu-west-1-i-0123456789abcdef0");
    assert_eq!(
        e.edge.media_public,
        Some("198.51.100.20:3478".parse().unwrap())
    );
    assert_eq!(e.tokens.public_keys.len(), 2);
    assert_eq!(e.edge.interactive_capacity, 300);

    let o = render(
        &modules.join("origin/templates/origin.toml.tftpl"),
        serde_json::json!({"id": "origin-2", "quic_port": 4433, "metrics_port": 9300}),
    );
    assert_eq!(
        check_origin(&write_temp("origin.toml", &o)).origin.id,
        "origin-2"
    );

    let p = render(
        &modules.join("packager/templates/packager.toml.tftpl"),
        serde_json::json!({"id": "packager-origin-1", "origin_addr": "203.0.113.10:4433",
            "origin_server_name": "origin.amphi.internal", "http_port": 8400}),
    );
    check_packager(&write_temp("packager.toml", &p));

    let r = render(
        &modules.join("geo-router/templates/router.toml.tftpl"),
        serde_json::json!({
            "region": "us-east-1", "http_port": 8080, "public_url": "https://api.example.com",
            "default_region": "us-east-1", "packager_url": "https://packager.example.com",
            "token_ttl_secs": 3600, "signing_kid": "k1",
            "edges": [
                {"id": "edge-us-east-1", "region": "us-east-1",
                 "public_url": "https://edge-us-east-1.example.com"},
                {"id": "edge-ap-southeast-2", "region": "ap-southeast-2",
                 "public_url": "https://edge-ap-southeast-2.example.com"},
            ],
            "coordinates": {
                "us-east-1": {"latitude": 38.95, "longitude": -77.45},
                "ap-southeast-2": {"latitude": -33.87, "longitude": 151.21},
            },
            "origins": [origin],
        }),
    );
    let router = check_router(&write_temp("geo-router.toml", &r));
    assert_eq!(router.router.edges.len(), 2);
    assert_eq!(router.router.edges[1].region.latitude, -33.87);
    assert_eq!(router.router.token_ttl_secs, 3600);
}

#[test]
fn terraform_user_data_renders_to_valid_bash() {
    let unit = std::fs::read_to_string(repo().join("infra/systemd/amphi-edge.service")).unwrap();
    let script = render(
        &repo().join("terraform/templates/user_data.sh.tftpl"),
        serde_json::json!({
            "role": "edge", "config": "[edge]\nid = \"x\"\n", "unit": unit,
            "artifact_bucket": "releases", "artifact_key": "amphi/amphi",
            "artifact_region": "us-east-1", "artifact_sha256": "00",
            "tls_secret_arn": "arn:aws:secretsmanager:us-east-1:1:secret:x",
            "signing_secret_arn": "", "secret_region": "us-east-1",
            "index_base": 96, "index_span": 48,
        }),
    );
    assert!(script.starts_with("#!/bin/bash\n"));
    assert!(script.contains("systemctl enable --now amphi-edge.service"));
    assert!(script.contains("ExecStart=/usr/local/bin/amphi edge --config /etc/amphi/edge.toml"));
    assert!(script.contains("% 48 + 96"));
    assert!(!script.contains("signing.pem"), "no signing key on edges");
    let path = write_temp("user_data.sh", &script);
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
