//! Checks of `infra/`: the Grafana dashboard is valid JSON, every metric the dashboard and the
//! Prometheus alert rules use is one a role serves (its name appears in that crate's sources), and
//! every systemd unit starts its role with the config file infra/config documents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `amphi_...` identifiers in a text, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("amphi_") {
        let tail = &rest[i..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        out.insert(base);
        rest = &tail[name.len()..];
    }
    out
}

/// The Rust sources of every role crate, concatenated.
fn role_sources() -> String {
    let mut all = String::new();
    for krate in ["edge-node", "origin", "cdn-packager", "geo-router"] {
        let mut stack = vec![repo().join(krate).join("src")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    all.push_str(&read(&p));
                }
            }
        }
    }
    all
}

#[test]
fn dashboard_and_alerts_use_metrics_the_roles_serve() {
    let dashboard = read(&repo().join("infra/grafana/amphi-dashboard.json"));
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let panels = parsed["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()));
    }
    let alerts = read(&repo().join("infra/prometheus/amphi-alerts.yml"));
    let sources = role_sources();
    let mut names = metric_names(&dashboard);
    names.extend(metric_names(&alerts));
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        assert!(
            sources.contains(&format!("\"{name}")) || sources.contains(&format!(" {name} ")),
            "{name} is used in infra/ but no role serves it"
        );
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
fn metric_name_scanner_strips_histogram_suffixes() {
    let names = metric_names("rate(amphi_a_bucket[5m]) + amphi_b_total{x=\"1\"} amphi_c_sum");
    let want: BTreeSet<String> = ["amphi_a", "amphi_b_total", "amphi_c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
}
