//! Rendering the role configs exactly as a Terraform deployment writes them: a module's template
//! (`terraform/modules/*/templates/*.toml.tftpl`, Terraform `templatefile` syntax: `${...}`,
//! `%{ for }`, `%{ if }`, `trimspace`, `jsonencode`) rendered with hcl-rs, then the boot-time
//! `@NAME@` placeholders that `terraform/templates/user_data.sh.tftpl` fills (instance values and
//! Secrets Manager secrets), and optionally the node's `/etc/amphi` and `/var/lib/amphi` moved to
//! scratch directories so the result runs on a test machine.
//!
//! Used by the config drift test (`src/roles_config_tests.rs`), by tests that start real role
//! processes from the rendered files (`tests/e2e_prod_config.rs`) and by the namespace test bed
//! ([`crate::bed`]).

use hcl::eval::{Context, Evaluate, FuncArgs, FuncDef, ParamType};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A role whose config a Terraform module renders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TfRole {
    /// `amphi edge` (terraform/modules/edge-region).
    Edge,
    /// `amphi origin` (terraform/modules/origin).
    Origin,
    /// `amphi packager` (terraform/modules/packager).
    Packager,
    /// `amphi geo-router` (terraform/modules/geo-router).
    Router,
}

impl TfRole {
    /// Every role.
    pub const ALL: [TfRole; 4] = [
        TfRole::Edge,
        TfRole::Origin,
        TfRole::Packager,
        TfRole::Router,
    ];

    /// The template, relative to the repository root.
    pub fn template(self) -> &'static str {
        match self {
            TfRole::Edge => "terraform/modules/edge-region/templates/edge.toml.tftpl",
            TfRole::Origin => "terraform/modules/origin/templates/origin.toml.tftpl",
            TfRole::Packager => "terraform/modules/packager/templates/packager.toml.tftpl",
            TfRole::Router => "terraform/modules/geo-router/templates/router.toml.tftpl",
        }
    }

    /// The documented example config, relative to the repository root.
    pub fn infra_config(self) -> &'static str {
        match self {
            TfRole::Edge => "infra/config/edge.toml",
            TfRole::Origin => "infra/config/origin.toml",
            TfRole::Packager => "infra/config/packager.toml",
            TfRole::Router => "infra/config/geo-router.toml",
        }
    }

    /// The `amphi` subcommand that reads it.
    pub fn subcommand(self) -> &'static str {
        match self {
            TfRole::Edge => "edge",
            TfRole::Origin => "origin",
            TfRole::Packager => "packager",
            TfRole::Router => "geo-router",
        }
    }
}

/// What user data fills in at boot, and where the node's directories are on this machine.
#[derive(Clone, Debug)]
pub struct BootValues {
    /// `@INSTANCE_ID@`.
    pub instance_id: String,
    /// `@PRIVATE_IPV4@`.
    pub private_ipv4: String,
    /// `@PUBLIC_IPV4@`.
    pub public_ipv4: String,
    /// `@NODE_NUMBER@` (the edge index).
    pub node_number: u8,
    /// Secrets by placeholder name (`API_KEY_SECRET` fills `@API_KEY_SECRET@`).
    pub secrets: BTreeMap<String, String>,
    /// Replaces `/etc/amphi` (configs, mesh TLS files, signing key) when set.
    pub etc_dir: Option<PathBuf>,
    /// Replaces `/var/lib/amphi` (data) when set.
    pub state_dir: Option<PathBuf>,
    /// Replaces the wildcard address of listeners (`"0.0.0.0:`) when set, e.g. `127.0.0.1` for a
    /// host that only has loopback.
    pub bind_ip: Option<String>,
}

impl Default for BootValues {
    fn default() -> Self {
        BootValues {
            instance_id: "i-0123456789abcdef0".into(),
            private_ipv4: "10.30.1.7".into(),
            public_ipv4: "198.51.100.20".into(),
            node_number: 103,
            secrets: BTreeMap::new(),
            etc_dir: None,
            state_dir: None,
            bind_ip: None,
        }
    }
}

fn trimspace(args: FuncArgs) -> Result<hcl::Value, String> {
    match &args[0] {
        hcl::Value::String(s) => Ok(hcl::Value::from(s.trim())),
        other => Err(format!("trimspace: not a string: {other:?}")),
    }
}

fn jsonencode(args: FuncArgs) -> Result<hcl::Value, String> {
    serde_json::to_string(&args[0])
        .map(hcl::Value::from)
        .map_err(|e| format!("jsonencode: {e}"))
}

/// Render `template` as Terraform's `templatefile(template, vars)` would (`vars`: a JSON object).
pub fn render_template(template: &Path, vars: &serde_json::Value) -> Result<String, String> {
    let text =
        std::fs::read_to_string(template).map_err(|e| format!("{}: {e}", template.display()))?;
    let parsed: hcl::Template = text
        .parse()
        .map_err(|e| format!("{}: {e}", template.display()))?;
    let mut ctx = Context::new();
    let vars = vars
        .as_object()
        .ok_or_else(|| "template variables must be a JSON object".to_string())?;
    for (k, v) in vars {
        let value = hcl::to_value(v).map_err(|e| format!("variable {k}: {e}"))?;
        ctx.declare_var(k.as_str(), value);
    }
    ctx.declare_func(
        "trimspace",
        FuncDef::builder().param(ParamType::String).build(trimspace),
    );
    ctx.declare_func(
        "jsonencode",
        FuncDef::builder().param(ParamType::Any).build(jsonencode),
    );
    parsed
        .evaluate(&ctx)
        .map_err(|e| format!("{}: {e}", template.display()))
}

/// Fill the boot-time placeholders as user data does, and move the node's directories. A
/// placeholder left unfilled is an error (a secret the test did not provide, or a typo).
pub fn fill_boot_values(rendered: &str, boot: &BootValues) -> Result<String, String> {
    let mut text = rendered
        .replace("@INSTANCE_ID@", &boot.instance_id)
        .replace("@PRIVATE_IPV4@", &boot.private_ipv4)
        .replace("@PUBLIC_IPV4@", &boot.public_ipv4)
        .replace("@NODE_NUMBER@", &boot.node_number.to_string());
    for (name, value) in &boot.secrets {
        text = text.replace(&format!("@{name}@"), value);
    }
    if let Some(left) = placeholders(&text).into_iter().next() {
        return Err(format!("placeholder @{left}@ was not filled"));
    }
    if let Some(dir) = &boot.etc_dir {
        text = text.replace("/etc/amphi", &dir.display().to_string());
    }
    if let Some(dir) = &boot.state_dir {
        text = text.replace("/var/lib/amphi", &dir.display().to_string());
    }
    if let Some(ip) = &boot.bind_ip {
        text = text.replace("\"0.0.0.0:", &format!("\"{ip}:"));
    }
    Ok(text)
}

/// Names of the `@NAME@` placeholders (`@` + upper case, digits, `_` + `@`) in `text`.
pub fn placeholders(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    for (i, _) in text.match_indices('@') {
        let name_len = b[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || **c == b'_')
            .count();
        if name_len > 0 && b.get(i + 1 + name_len) == Some(&b'@') {
            out.push(text[i + 1..i + 1 + name_len].to_string());
        }
    }
    out
}

/// The config file a Terraform-provisioned `role` node runs with: its module's template rendered
/// with `vars` (the module's `templatefile` arguments) and filled with `boot`. `repo` is the
/// repository root.
pub fn render_role_config(
    repo: &Path,
    role: TfRole,
    vars: &serde_json::Value,
    boot: &BootValues,
) -> Result<String, String> {
    let rendered = render_template(&repo.join(role.template()), vars)?;
    fill_boot_values(&rendered, boot)
}
