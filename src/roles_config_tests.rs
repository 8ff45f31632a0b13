//! The deployment configs load through the very loader `amphi <role> --config FILE` uses: the
//! documented examples in `infra/config/` and the configs the Terraform modules render into user
//! data (`terraform/modules/*/templates/*.toml.tftpl`, rendered with hcl-rs by
//! `tools/src/tfrender.rs`, the renderer the process tests use too). Keys a role does not know
//! would be silently ignored by serde, so each file's keys are also checked against the config
//! types, and each rendered template must have exactly the keys of its documented example (the
//! drift test).

use super::{EdgeFile, EdgeRegistrationFile, OriginFile, PackagerFile, RouterFile};
use crate::config;
use amphi_protocol::config::{EdgeConfig, OriginConfig, PackagerConfig, RouterConfig, TlsFiles};
use amphi_protocol::token::TokenVerifier;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use amphi_tools::tfrender;
use tfrender::{render_role_config, BootValues, TfRole};

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

/// Deserialize section `name` as the config type `T` and check its keys against it.
fn section<T: Serialize + DeserializeOwned>(table: &toml::Table, name: &str) {
    section_of(table, name, &[known::<T>(table, name)]);
}

/// Section `name` deserialized as `T` and serialized back: the keys `T` knows (of those present).
fn known<T: Serialize + DeserializeOwned>(table: &toml::Table, name: &str) -> toml::Value {
    let file = table
        .get(name)
        .unwrap_or_else(|| panic!("no [{name}] section"));
    let parsed: T = file
        .clone()
        .try_into()
        .unwrap_or_else(|e| panic!("[{name}]: {e}"));
    toml::Value::try_from(&parsed).unwrap()
}

/// Check section `name`'s keys against the union of `knowns` (types read from the same table).
fn section_of(table: &toml::Table, name: &str, knowns: &[toml::Value]) {
    let mut union = toml::Table::new();
    for k in knowns {
        for (key, v) in k.as_table().unwrap() {
            union.insert(key.clone(), v.clone());
        }
    }
    assert_keys_known(&table[name], &toml::Value::Table(union), name);
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
    only_sections(&table, &["edge", "registration", "tls", "tokens"]);
    section::<EdgeConfig>(&table, "edge");
    if table.contains_key("registration") {
        section::<EdgeRegistrationFile>(&table, "registration");
    }
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

/// Loads the origin config as `amphi origin` does; returns it and its `redis_url`.
fn check_origin(path: &Path) -> (OriginFile, Option<String>) {
    let file: OriginFile = config::load(Some(path)).unwrap();
    let options: super::OriginOptionsFile = config::load(Some(path)).unwrap();
    let table = read_table(path);
    only_sections(&table, &["origin", "tls"]);
    section_of(
        &table,
        "origin",
        &[
            known::<OriginConfig>(&table, "origin"),
            known::<super::OriginOptionsSection>(&table, "origin"),
        ],
    );
    section::<TlsFiles>(&table, "tls");
    (file, options.origin.redis_url)
}

fn check_packager(path: &Path) -> amphi_packager::PackagerOptions {
    let file: PackagerFile = config::load(Some(path)).unwrap();
    let options: super::PackagerOptionsFile = config::load(Some(path)).unwrap();
    let table = read_table(path);
    only_sections(&table, &["packager", "tls", "tokens"]);
    // The router's keys are real Ed25519 public keys, as the packager checks them at start.
    let keys = file.tokens.as_ref().map_or(&[][..], |t| &t.public_keys);
    super::verifier(keys).unwrap();
    section_of(
        &table,
        "packager",
        &[
            known::<PackagerConfig>(&table, "packager"),
            known::<amphi_packager::PackagerOptions>(&table, "packager"),
        ],
    );
    section::<TlsFiles>(&table, "tls");
    options.packager
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
    // A production router: it refuses to start without API keys.
    assert!(!router.router.api_keys.is_empty());
    assert!(router.router.hls_base_url.is_some());
    assert!(router.router.https.listener().unwrap().is_some());
    let reg = edge.registration.expect("[registration]");
    assert_eq!(
        reg.api_key_id.as_deref(),
        Some(router.router.api_keys[0].id.as_str())
    );
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

/// Render `role`'s Terraform template with `vars` and the default boot values plus `secrets`.
fn render(role: TfRole, vars: serde_json::Value) -> String {
    let boot = BootValues {
        secrets: [
            ("API_KEY_SECRET", "api-key-secret-from-secrets-manager"),
            ("REDIS_AUTH_TOKEN", "redis-auth-token"),
            ("S3_ACCESS_KEY", "s3-access-key"),
            ("S3_SECRET_KEY", "s3-secret-key"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..BootValues::default()
    };
    render_role_config(&repo(), role, &vars, &boot).unwrap()
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

/// The `templatefile` arguments each module passes, with test values (every option on).
fn module_vars(role: TfRole) -> serde_json::Value {
    let origin = serde_json::json!({"id": "origin-1", "addr": "203.0.113.10:4433",
        "server_name": "origin.amphi.internal"});
    match role {
        TfRole::Edge => serde_json::json!({
            "region": "eu-west-1", "http_port": 8080, "media_port": 3478,
            "webtransport_port": 4433, "tls_server_name": "edge.amphi.internal",
            "public_url": "https://edge-eu-west-1.example.com",
            "origins": [origin],
            "router_url": "https://api.example.com",
            "interactive_capacity": 300, "ice_connect_timeout_secs": 15, "media_threads": 0, "backend_tls": true,
            "capacity": 800, "api_key_id": "edge", "drain_grace_secs": 120, "vpc_cidr": "10.30.0.0/16",
            "token_public_keys": [
                {"kid": "k1", "pem": example_public_key()},
                {"kid": "k0", "pem": example_public_key()},
            ],
        }),
        TfRole::Origin => {
            serde_json::json!({"id": "origin-2", "quic_port": 4433, "metrics_port": 9300, "idle_room_timeout_secs": 3600,
                "redis_url": "rediss://:@REDIS_AUTH_TOKEN@@redis.example.internal:6379/1"})
        }
        TfRole::Packager => serde_json::json!({"id": "packager-1",
            "origins": [origin, {"id": "origin-2", "addr": "203.0.113.11:4433",
                "server_name": "origin.amphi.internal"}],
            "http_port": 8400, "https_port": 8443,
            "storage_bucket": "amphi-media", "storage_region": "us-east-1",
            "storage_endpoint": "http://10.30.1.9:9000", "storage_static_keys": true,
            "token_public_keys": [{"kid": "k1", "pem": example_public_key()}]}),
        TfRole::Router => serde_json::json!({
            "region": "us-east-1", "http_port": 8080, "public_url": "https://api.example.com",
            "default_region": "us-east-1", "packager_url": "https://packager.example.com",
            "hls_base_url": "https://hls.example.com",
            "token_ttl_secs": 3600, "signing_kid": "k1",
            "trusted_proxies": ["10.10.0.0/16", "10.20.0.0/16"],
            "redis_url": "rediss://:@REDIS_AUTH_TOKEN@@redis.example.internal:6379",
            "api_key_id": "edge",
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
            "geoip": ["/var/lib/amphi/geoip/city.mmdb"],
        }),
    }
}

/// Load a rendered config as `amphi <role> --config` does, checking its keys.
fn check_role(role: TfRole, path: &Path) {
    match role {
        TfRole::Edge => {
            check_edge(path);
        }
        TfRole::Origin => {
            check_origin(path);
        }
        TfRole::Packager => {
            check_packager(path);
        }
        TfRole::Router => {
            check_router(path);
        }
    }
}

#[test]
fn terraform_rendered_configs_load_with_every_key_known() {
    let edge = render(TfRole::Edge, module_vars(TfRole::Edge));
    let e = check_edge(&write_temp("edge.toml", &edge));
    assert_eq!(e.edge.index, 103);
    assert_eq!(e.edge.id, "edge-eu-west-1-i-0123456789abcdef0");
    assert_eq!(
        e.edge.media_public,
        Some("198.51.100.20:3478".parse().unwrap())
    );
    assert_eq!(e.tokens.public_keys.len(), 2);
    assert_eq!(e.edge.interactive_capacity, 300);
    assert!(e.edge.https.listener().unwrap().is_some());
    let reg = e.registration.expect("[registration]");
    assert_eq!(reg.api_key_id.as_deref(), Some("edge"));
    assert_eq!(
        reg.api_key_secret.as_deref(),
        Some("api-key-secret-from-secrets-manager")
    );
    assert_eq!((reg.capacity, reg.drain_grace_secs), (Some(800), Some(120)));

    // Without backend TLS the edge listens in plain HTTP (the NLB target group stays sticky TCP).
    let mut plain = module_vars(TfRole::Edge);
    plain["backend_tls"] = false.into();
    let p = check_edge(&write_temp("edge-plain.toml", &render(TfRole::Edge, plain)));
    assert!(p.edge.https.listener().unwrap().is_none());
    assert!(p.edge.https.tls_ca.is_some());

    let o = render(TfRole::Origin, module_vars(TfRole::Origin));
    let (origin, redis_url) = check_origin(&write_temp("origin.toml", &o));
    assert_eq!(origin.origin.id, "origin-2");
    // Room state survives a move to another origin only with Redis.
    assert_eq!(
        redis_url.as_deref(),
        Some("rediss://:redis-auth-token@redis.example.internal:6379/1")
    );
    let mut no_redis = module_vars(TfRole::Origin);
    no_redis["redis_url"] = "".into();
    let o = render(TfRole::Origin, no_redis);
    assert_eq!(check_origin(&write_temp("origin-mem.toml", &o)).1, None);

    // One packager set: every packager links to every origin and stores in S3.
    let p = render(TfRole::Packager, module_vars(TfRole::Packager));
    let path = write_temp("packager.toml", &p);
    let packager: PackagerFile = config::load(Some(&path)).unwrap();
    assert_eq!(packager.packager.origin_endpoints().unwrap().len(), 2);
    let storage = check_packager(&path).storage;
    assert_eq!(storage.backend, amphi_packager::Backend::S3);
    assert_eq!(
        (storage.bucket.as_str(), storage.prefix.as_deref()),
        ("amphi-media", Some("hls"))
    );
    assert_eq!(storage.endpoint.as_deref(), Some("http://10.30.1.9:9000"));
    assert!(storage.path_style);
    assert_eq!(storage.access_key.as_deref(), Some("s3-access-key"));
    assert_eq!(storage.secret_key.as_deref(), Some("s3-secret-key"));
    // On AWS: no endpoint, no static keys (the instance profile signs).
    let mut aws = module_vars(TfRole::Packager);
    aws["storage_endpoint"] = "".into();
    aws["storage_static_keys"] = false.into();
    let p = render(TfRole::Packager, aws);
    let storage = check_packager(&write_temp("packager-aws.toml", &p)).storage;
    assert_eq!(storage.backend, amphi_packager::Backend::S3);
    assert_eq!(
        (storage.endpoint, storage.access_key, storage.secret_key),
        (None, None, None)
    );
    assert!(!storage.path_style);

    // Edges that register need no static entry; no GeoIP database: default_region for all.
    let mut registered = module_vars(TfRole::Router);
    registered["edges"] = serde_json::json!([]);
    registered["geoip"] = serde_json::json!([]);
    let r = render(TfRole::Router, registered);
    let router = check_router(&write_temp("geo-router-reg.toml", &r)).router;
    assert!(router.edges.is_empty() && router.geoip.is_empty());

    let r = render(TfRole::Router, module_vars(TfRole::Router));
    let router = check_router(&write_temp("geo-router.toml", &r)).router;
    assert_eq!(router.geoip, [Path::new("/var/lib/amphi/geoip/city.mmdb")]);
    assert_eq!(router.edges.len(), 2);
    assert_eq!(router.edges[1].region.latitude, -33.87);
    assert_eq!(router.token_ttl_secs, 3600);
    assert!(!router.dev_mode);
    // What a production router needs to start and to route correctly behind its load balancer.
    assert_eq!(router.api_keys.len(), 1);
    assert_eq!(router.api_keys[0].id, "edge");
    assert_eq!(
        router.api_keys[0].secret,
        "api-key-secret-from-secrets-manager"
    );
    assert_eq!(router.trusted_proxies, ["10.10.0.0/16", "10.20.0.0/16"]);
    assert_eq!(
        router.redis_url.as_deref(),
        Some("rediss://:redis-auth-token@redis.example.internal:6379")
    );
    assert_eq!(
        router.hls_base_url.as_deref(),
        Some("https://hls.example.com")
    );
    assert!(router.https.listener().unwrap().is_some());
}

/// Every key path of a TOML document: `a.b` for keys of tables (inline or not), `a[].b` for keys
/// of arrays of tables (the union over their elements).
fn key_paths(table: &toml::Table) -> BTreeSet<String> {
    fn walk(t: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
        for (k, v) in t {
            let path = format!("{prefix}{k}");
            match v {
                toml::Value::Table(inner) => walk(inner, &format!("{path}."), out),
                toml::Value::Array(items)
                    if !items.is_empty() && items.iter().all(toml::Value::is_table) =>
                {
                    for item in items {
                        walk(item.as_table().unwrap(), &format!("{path}[]."), out);
                    }
                }
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(table, "", &mut out);
    out
}

/// What one document has and the other lacks, as a readable message (`None`: same key sets).
fn key_drift(a_name: &str, a: &toml::Table, b_name: &str, b: &toml::Table) -> Option<String> {
    let (ka, kb) = (key_paths(a), key_paths(b));
    let only_a: Vec<&String> = ka.difference(&kb).collect();
    let only_b: Vec<&String> = kb.difference(&ka).collect();
    (!only_a.is_empty() || !only_b.is_empty())
        .then(|| format!("only in {a_name}: {only_a:?}; only in {b_name}: {only_b:?}"))
}

#[test]
fn terraform_templates_and_infra_configs_have_the_same_keys_and_load() {
    for role in TfRole::ALL {
        let rendered = render(role, module_vars(role));
        let path = write_temp(&format!("drift-{}.toml", role.subcommand()), &rendered);
        // Accepted by the loader `amphi <role> --config` runs, every key known.
        check_role(role, &path);
        let infra = read_table(&repo().join(role.infra_config()));
        let drift = key_drift(
            role.template(),
            &rendered.parse().unwrap(),
            role.infra_config(),
            &infra,
        );
        assert!(drift.is_none(), "{role:?} drifted: {}", drift.unwrap());
    }
}

#[test]
fn the_drift_check_sees_a_key_in_one_file_only() {
    let infra = read_table(&repo().join(TfRole::Router.infra_config()));
    assert_eq!(key_drift("a", &infra, "b", &infra), None);
    let mut extra = infra.clone();
    extra["router"]
        .as_table_mut()
        .unwrap()
        .insert("load_threshold".into(), 0.7.into());
    let msg = key_drift("template", &extra, "infra", &infra).expect("drift");
    assert!(
        msg.contains("only in template: [\"router.load_threshold\"]"),
        "{msg}"
    );
    // A key of one array-of-tables element counts too.
    let mut fewer = infra.clone();
    fewer["router"]["origins"].as_array_mut().unwrap()[0]
        .as_table_mut()
        .unwrap()
        .remove("server_name");
    let msg = key_drift("template", &fewer, "infra", &infra).expect("drift");
    assert!(
        msg.contains("only in infra: [\"router.origins[].server_name\"]"),
        "{msg}"
    );
}

#[test]
fn unfilled_boot_placeholders_are_refused() {
    let rendered = tfrender::render_template(
        &repo().join(TfRole::Router.template()),
        &module_vars(TfRole::Router),
    )
    .unwrap();
    assert_eq!(
        tfrender::placeholders(&rendered),
        ["INSTANCE_ID", "REDIS_AUTH_TOKEN", "API_KEY_SECRET"]
    );
    let err = tfrender::fill_boot_values(&rendered, &BootValues::default()).unwrap_err();
    assert!(err.contains("@REDIS_AUTH_TOKEN@"), "{err}");
}

#[test]
fn terraform_user_data_renders_to_valid_bash() {
    let unit = std::fs::read_to_string(repo().join("infra/systemd/amphi-edge.service")).unwrap();
    let script = tfrender::render_template(
        &repo().join("terraform/templates/user_data.sh.tftpl"),
        &serde_json::json!({
            "role": "edge", "config": "[edge]\nid = \"x\"\n", "unit": unit,
            "artifact_bucket": "releases", "artifact_key": "amphi/amphi",
            "artifact_region": "us-east-1", "artifact_sha256": "00",
            "tls_secret_arn": "arn:aws:secretsmanager:us-east-1:1:secret:x",
            "signing_secret_arn": "", "secret_region": "us-east-1",
            "index_base": 96, "index_span": 48,
            "config_secrets": {"API_KEY_SECRET": "arn:aws:secretsmanager:us-east-1:1:secret:k"},
            "geoip_object_key": "",
        }),
    )
    .unwrap();
    assert!(script.starts_with("#!/bin/bash\n"));
    assert!(script.contains("systemctl enable --now amphi-edge.service"));
    assert!(script.contains("ExecStart=/usr/local/bin/amphi edge --config /etc/amphi/edge.toml"));
    assert!(script.contains("% 48 + 96"));
    assert!(!script.contains("signing.pem"), "no signing key on edges");
    assert!(script.contains(r#"--secret-id "arn:aws:secretsmanager:us-east-1:1:secret:k""#));
    // The substitution lines, run on their own: secrets go in literally, whatever they hold.
    let substitutions: String = script
        .lines()
        .filter(|l| l.starts_with("config=${config//") || l.starts_with("shopt"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        substitutions.matches("config=").count(),
        5,
        "{substitutions}"
    );
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "INSTANCE_ID=i-1 PRIVATE_IPV4=10.0.0.1 PUBLIC_IPV4=1.2.3.4 NODE_NUMBER=7 \
             value='a&b/c\\d'; config='id=@INSTANCE_ID@ k=@API_KEY_SECRET@ n=@NODE_NUMBER@'\n\
             {substitutions}printf '%s' \"$config\""
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        r"id=i-1 k=a&b/c\d n=7",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
