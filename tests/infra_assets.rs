//! Checks of `infra/`: the Grafana dashboard is valid JSON, every `amphi_*` sample the dashboard,
//! the Prometheus alert rules and the metrics list in `infra/README.md` name is one a role's
//! registry declares (so they cannot drift from the binary), and every systemd unit starts its role
//! with the config file infra/config documents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `amphi_...` identifiers in a text, as written (a bare `amphi_` prefix, as in `amphi_*`, is
/// not a name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("amphi_") {
        let tail = &rest[i..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &tail[name.len()..];
        if name != "amphi_" {
            out.insert(name);
        }
    }
    out
}

/// Every sample name the four roles' registries declare.
fn declared_samples() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    all.extend(
        amphi_edge::metrics::Metrics::new("us-east")
            .sample_names()
            .iter()
            .cloned(),
    );
    all.extend(
        amphi_origin::metrics::Metrics::default()
            .sample_names()
            .iter()
            .cloned(),
    );
    all.extend(
        amphi_packager::metrics::Metrics::default()
            .sample_names()
            .iter()
            .cloned(),
    );
    all.extend(
        amphi_geo_router::metrics::Metrics::default()
            .sample_names()
            .iter()
            .cloned(),
    );
    all
}

#[test]
fn dashboard_alerts_and_docs_use_metrics_the_roles_declare() {
    let dashboard = read(&repo().join("infra/grafana/amphi-dashboard.json"));
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let panels = parsed["panels"].as_array().unwrap();
    assert!(panels.len() >= 20);
    for p in panels {
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()));
    }
    let declared = declared_samples();
    assert!(declared.len() >= 80, "{declared:?}");
    for file in [
        "infra/grafana/amphi-dashboard.json",
        "infra/prometheus/amphi-alerts.yml",
        "infra/README.md",
    ] {
        let used = metric_names(&read(&repo().join(file)));
        assert!(used.len() >= 15, "{file}: {used:?}");
        for name in &used {
            assert!(
                declared.contains(name),
                "{file} uses {name}, which no role declares"
            );
        }
    }
    // The README lists every family (a histogram by its base name, a counter with `_total`).
    let listed = metric_names(&read(&repo().join("infra/README.md")));
    for sample in &declared {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| sample.strip_suffix(s))
            .unwrap_or(sample);
        let documented = listed.contains(sample)
            || listed.contains(&format!("{family}_bucket"))
            || listed.contains(&format!("{family}_count"));
        assert!(documented, "{sample} is not listed in infra/README.md");
    }
    // Every role is scraped.
    let scrape = read(&repo().join("infra/prometheus/prometheus.yml"));
    for job in [
        "amphi-edge",
        "amphi-origin",
        "amphi-packager",
        "amphi-geo-router",
    ] {
        assert!(scrape.contains(&format!("job_name: {job}")), "{job}");
    }
}

#[test]
fn systemd_units_start_each_role_with_its_documented_config() {
    for role in ["edge", "origin", "packager", "geo-router"] {
        let unit = read(&repo().join(format!("infra/systemd/amphi-{role}.service")));
        let exec = format!("ExecStart=/usr/local/bin/amphi {role} --config /etc/amphi/{role}.toml");
        assert!(unit.contains(&exec), "amphi-{role}.service: {exec}");
        assert!(unit.contains("User=amphi"));
        assert!(unit.contains("NoNewPrivileges=yes"));
        assert!(repo().join(format!("infra/config/{role}.toml")).is_file());
    }
}

#[test]
fn metric_name_scanner_reads_names_as_written() {
    let names = metric_names("rate(amphi_a_bucket[5m]) + amphi_b_total{x=\"1\"} amphi_c amphi_*");
    let want: BTreeSet<String> = ["amphi_a_bucket", "amphi_b_total", "amphi_c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
}
