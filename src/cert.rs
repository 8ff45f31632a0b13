//! `amphi cert ...`: the mesh CA and role certificates (see infra/README.md, "The mesh and its
//! secrets"). Every node certificate carries the `amphi-role:` URI SAN of what it runs as; the
//! origin refuses a peer whose `Hello` claims a role its certificate does not carry.

use amphi_common::mtls::{DevPki, MeshRole};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// `amphi cert ...`
#[derive(Args)]
pub struct CertArgs {
    #[command(subcommand)]
    command: CertCommand,
}

#[derive(Subcommand)]
enum CertCommand {
    /// Make a mesh CA: writes `ca.pem` and `ca.key.pem` (keep the key offline) into `--out`.
    Ca {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a node certificate for one mesh role: writes `ca.pem`, `cert.pem`, `key.pem` (the
    /// files a node reads from `/etc/amphi/tls/`) into `--out`.
    Issue {
        /// Directory holding `ca.pem` and `ca.key.pem` from `amphi cert ca`.
        #[arg(long)]
        ca: PathBuf,
        /// origin, edge, packager or router.
        #[arg(long, value_parser = parse_mesh_role)]
        role: MeshRole,
        /// DNS names or IP addresses the certificate is valid for (repeat; the first is the
        /// common name). An origin's must include the `origin_server_name` its peers use.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_mesh_role(s: &str) -> Result<MeshRole, String> {
    MeshRole::parse(s).ok_or_else(|| "role must be origin, edge, packager or router".to_string())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// Write `text` to `dir/name`; private keys are made readable by their owner only.
fn write(dir: &Path, name: &str, text: &str, private: bool) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    println!("wrote {}", path.display());
    Ok(())
}

/// Run `amphi cert ...`.
pub fn run(args: CertArgs) -> Result<()> {
    match args.command {
        CertCommand::Ca { out } => {
            std::fs::create_dir_all(&out)?;
            let pki = DevPki::generate()?;
            write(&out, "ca.pem", &pki.ca_pem(), false)?;
            write(&out, "ca.key.pem", &pki.ca_key_pem(), true)
        }
        CertCommand::Issue {
            ca,
            role,
            names,
            out,
        } => {
            let ca_pem = read(&ca.join("ca.pem"))?;
            let pki = DevPki::from_pem(&ca_pem, &read(&ca.join("ca.key.pem"))?)?;
            let issued = pki.issue_pem_for(&names, &[role])?;
            std::fs::create_dir_all(&out)?;
            // The CA certificate as written by `amphi cert ca` (the one every node trusts).
            write(&out, "ca.pem", &ca_pem, false)?;
            write(&out, "cert.pem", &issued.cert, false)?;
            write(&out, "key.pem", &issued.key, true)?;
            println!("role {} ({}), names {}", role, role.uri(), names.join(", "));
            Ok(())
        }
    }
}
