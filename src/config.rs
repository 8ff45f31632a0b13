//! Loading role configuration: a TOML file overlaid with `AMPHI__SECTION__KEY=value` environment
//! variables (double underscores separate levels; values parse as TOML scalars, else strings).

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Read `path` (if given), apply environment overrides, and deserialize.
pub fn load<T: DeserializeOwned>(path: Option<&Path>) -> Result<T> {
    let mut value = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("parsing config {}", p.display()))?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut value, std::env::vars())?;
    toml::Value::Table(value)
        .try_into()
        .context("config is incomplete or has wrong types")
}

/// Overlay `AMPHI__A__B=v` variables onto the table (`[a] b = v`).
fn apply_env(table: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) -> Result<()> {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix("AMPHI__") else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            bail!("bad config variable {name}");
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let (last, parents) = keys.split_last().expect("non-empty");
        let mut cur = &mut *table;
        for k in parents {
            cur = cur
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("{name}: {k} is not a table"))?;
        }
        cur.insert(last.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_nested_keys_with_typed_values() {
        let mut t: toml::Table = "[edge]\nid = \"a\"\nindex = 1\n".parse().unwrap();
        let vars = vec![
            ("AMPHI__EDGE__INDEX".to_string(), "7".to_string()),
            ("AMPHI__EDGE__REGION".to_string(), "eu-west".to_string()),
            ("AMPHI__TLS__CA".to_string(), "/x/ca.pem".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        apply_env(&mut t, vars.into_iter()).unwrap();
        assert_eq!(t["edge"]["index"].as_integer(), Some(7));
        assert_eq!(t["edge"]["region"].as_str(), Some("eu-west"));
        assert_eq!(t["edge"]["id"].as_str(), Some("a"));
        assert_eq!(t["tls"]["ca"].as_str(), Some("/x/ca.pem"));
        assert!(!t.contains_key("path"));
    }

    #[test]
    fn env_refuses_bad_names() {
        let mut t = toml::Table::new();
        let vars = vec![("AMPHI__EDGE____X".to_string(), "1".to_string())];
        assert!(apply_env(&mut t, vars.into_iter()).is_err());
    }
}
