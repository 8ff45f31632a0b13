//! Single-role entry points (`amphi edge|origin|packager|geo-router`) and `amphi token`.

use crate::config;
use amphi_common::mtls::MtlsMaterial;
use amphi_protocol::config::{
    EdgeConfig, OriginConfig, PackagerConfig, PublicKeyConfig, RouterConfig, TlsFiles,
};
use amphi_protocol::token::{Claims, Role, TokenSigner, TokenVerifier};
use amphi_protocol::RoomId;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// A token-signing key on disk.
#[derive(Deserialize)]
struct SigningFile {
    kid: String,
    key_file: PathBuf,
}

/// Token verification keys.
#[derive(Deserialize)]
struct TokensFile {
    public_keys: Vec<PublicKeyConfig>,
}

#[derive(Deserialize)]
struct EdgeFile {
    edge: EdgeConfig,
    tls: TlsFiles,
    tokens: TokensFile,
    /// Registration with the geo-router (heartbeats, draining).
    #[serde(default)]
    registration: Option<EdgeRegistrationFile>,
}

/// `[registration]` of an edge config.
#[derive(Deserialize, Serialize, Default)]
struct EdgeRegistrationFile {
    /// Most WebRTC sessions this edge takes.
    capacity: Option<u32>,
    /// API key id that signs heartbeats (production routers require one).
    api_key_id: Option<String>,
    /// Its secret.
    api_key_secret: Option<String>,
    /// Longest a SIGTERM drain waits for sessions to end, seconds.
    drain_grace_secs: Option<u64>,
}

#[derive(Deserialize)]
struct OriginFile {
    origin: OriginConfig,
    tls: TlsFiles,
}

/// The optional keys of `[origin]` (`redis_url`: durable room state), read from the same file
/// as [`OriginFile`].
#[derive(Deserialize)]
struct OriginOptionsFile {
    #[serde(default)]
    origin: OriginOptionsSection,
}

#[derive(Deserialize, Serialize, Default)]
struct OriginOptionsSection {
    #[serde(default)]
    redis_url: Option<String>,
}

#[derive(Deserialize)]
struct PackagerFile {
    packager: PackagerConfig,
    tls: TlsFiles,
    /// The geo-router's token verification keys (its recording grants); optional.
    #[serde(default)]
    tokens: Option<TokensFile>,
}

/// The optional keys of `[packager]` (`storage`, `recording`, `tls_*`; see amphi-packager),
/// read from the same file as [`PackagerFile`].
#[derive(Deserialize)]
struct PackagerOptionsFile {
    #[serde(default)]
    packager: amphi_packager::PackagerOptions,
}

#[derive(Deserialize)]
struct RouterFile {
    router: RouterConfig,
    signing: SigningFile,
    /// mTLS material for the links to `router.origins`.
    #[serde(default)]
    tls: Option<TlsFiles>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn load_tls(files: &TlsFiles) -> Result<MtlsMaterial> {
    Ok(MtlsMaterial::from_pem(
        &read(&files.ca)?,
        &read(&files.cert)?,
        &read(&files.key)?,
    )?)
}

fn load_signer(s: &SigningFile) -> Result<TokenSigner> {
    TokenSigner::from_pkcs8_pem(s.kid.clone(), &read(&s.key_file)?)
        .context("loading the signing key")
}

/// A token that fires on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// A verifier of the tokens signed by `keys`.
fn verifier(keys: &[PublicKeyConfig]) -> Result<TokenVerifier> {
    let mut tokens = TokenVerifier::default();
    for k in keys {
        tokens
            .add_public_pem(k.kid.clone(), &k.pem)
            .with_context(|| format!("token key {}", k.kid))?;
    }
    Ok(tokens)
}

/// `amphi edge`.
pub async fn edge(path: Option<PathBuf>) -> Result<()> {
    let file: EdgeFile = config::load(path.as_deref())?;
    let tokens = verifier(&file.tokens.public_keys)?;
    let setup = amphi_edge::EdgeSetup {
        config: file.edge,
        mesh_tls: load_tls(&file.tls)?,
        tokens,
    };
    // SIGTERM drains (no new sessions; exit when empty or after the grace period); Ctrl-C stops.
    let reg = file.registration.unwrap_or_default();
    let options = amphi_edge::registration::RegistrationOptions {
        capacity: reg.capacity.unwrap_or(1000),
        api_key: reg.api_key_id.zip(reg.api_key_secret),
        exit_when_drained: true,
        drain_grace: std::time::Duration::from_secs(reg.drain_grace_secs.unwrap_or(300)),
    };
    let drain = std::sync::Arc::new(amphi_edge::registration::DrainHandle::default());
    let shutdown = CancellationToken::new();
    {
        let (drain, shutdown) = (drain.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => { shutdown.cancel(); return; }
                    _ = term.recv() => drain.start(),
                }
            }
        });
    }
    amphi_edge::run_with(setup, Some(options), drain, shutdown).await?;
    Ok(())
}

/// `amphi origin`.
pub async fn origin(path: Option<PathBuf>) -> Result<()> {
    let file: OriginFile = config::load(path.as_deref())?;
    let options: OriginOptionsFile = config::load(path.as_deref())?;
    let setup = amphi_origin::OriginSetup {
        config: file.origin,
        mesh_tls: load_tls(&file.tls)?,
    };
    let options = amphi_origin::OriginOptions {
        redis_url: options.origin.redis_url,
    };
    amphi_origin::run_with(setup, options, shutdown_on_signal()).await?;
    Ok(())
}

/// `amphi packager`.
pub async fn packager(path: Option<PathBuf>) -> Result<()> {
    let file: PackagerFile = config::load(path.as_deref())?;
    let options: PackagerOptionsFile = config::load(path.as_deref())?;
    let setup = amphi_packager::PackagerSetup {
        config: file.packager,
        options: options.packager,
        mesh_tls: load_tls(&file.tls)?,
        tokens: verifier(file.tokens.as_ref().map_or(&[][..], |t| &t.public_keys))?,
    };
    amphi_packager::run(setup, shutdown_on_signal()).await?;
    Ok(())
}

/// `amphi geo-router`.
pub async fn geo_router(path: Option<PathBuf>) -> Result<()> {
    let file: RouterFile = config::load(path.as_deref())?;
    let setup = amphi_geo_router::RouterSetup {
        config: file.router,
        signer: load_signer(&file.signing)?,
        web: crate::web::assets(),
        mesh_tls: file.tls.as_ref().map(load_tls).transpose()?,
    };
    amphi_geo_router::run(setup, shutdown_on_signal()).await?;
    Ok(())
}

/// `amphi token ...`
#[derive(Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Generate an Ed25519 signing key (PKCS#8 PEM) and print its public key (SPKI PEM).
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Mint a room token and print it.
    Mint {
        /// PKCS#8 PEM private key file.
        #[arg(long)]
        key: PathBuf,
        /// Key id written into the token header.
        #[arg(long, default_value = "k1")]
        kid: String,
        /// Room id (16 hex digits).
        #[arg(long)]
        room: RoomId,
        /// host, speaker or listener.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The user's id in your application (the token's `sub`: bans, session caps and chat
        /// limits follow it); default the display name.
        #[arg(long)]
        user: Option<String>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| "role must be host, speaker or listener".to_string())
}

/// Run `amphi token`.
pub fn token(args: TokenArgs) -> Result<()> {
    match args.command {
        TokenCommand::Keygen { out } => {
            let signer = TokenSigner::generate("k1");
            write_private(&out, &signer.to_pkcs8_pem())?;
            print!("{}", signer.public_pem());
        }
        TokenCommand::Mint {
            key,
            kid,
            room,
            role,
            name,
            ttl,
            user,
        } => {
            let signer = TokenSigner::from_pkcs8_pem(kid, &read(&key)?)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let jti: u128 = rand_jti();
            println!(
                "{}",
                signer.sign(&Claims {
                    sub: user.unwrap_or_else(|| name.clone()),
                    name,
                    room,
                    role,
                    iat: now,
                    exp: now + ttl,
                    jti: format!("{jti:032x}"),
                })
            );
        }
    }
    Ok(())
}

fn rand_jti() -> u128 {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("/dev/urandom");
    u128::from_le_bytes(b)
}

/// Write a secret file readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
#[path = "roles_config_tests.rs"]
mod config_tests;
