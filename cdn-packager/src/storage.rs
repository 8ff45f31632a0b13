//! Where parts, segments, playlists and recordings go: a [`Storage`] trait with two real
//! backends, the local filesystem (the embedded default) and S3 (`aws-sdk-s3`, any
//! S3-compatible endpoint).
//!
//! Keys are relative paths such as `{room}/opus/part12.3.m4s`; the filesystem backend stores
//! them under `{data_dir}/hls/`, the S3 backend under `{prefix}/` in its bucket.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

/// `Cache-Control` of parts, segments and init segments: they never change.
pub const IMMUTABLE: &str = "max-age=31536000, immutable";
/// `Cache-Control` of playlists written to storage.
pub const PLAYLIST_CACHE: &str = "max-age=1";

/// Content types.
pub mod content_type {
    /// HLS playlists.
    pub const PLAYLIST: &str = "application/vnd.apple.mpegurl";
    /// fMP4 parts, segments, init segments (audio only).
    pub const MEDIA: &str = "audio/mp4";
    /// JSON metadata.
    pub const JSON: &str = "application/json";
    /// The recording index.
    pub const TEXT: &str = "text/plain; charset=utf-8";
    /// WebVTT (the recording's chapters).
    pub const VTT: &str = "text/vtt; charset=utf-8";
}

/// Storage backend selection, `[packager.storage]` in the packager's TOML.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `filesystem` (default) or `s3`.
    #[serde(default)]
    pub backend: Backend,
    /// S3 bucket.
    #[serde(default)]
    pub bucket: String,
    /// Key prefix inside the bucket (default `hls`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Endpoint URL for S3-compatible servers (default: AWS for the region).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers.
    #[serde(default)]
    pub path_style: bool,
    /// Static access key id (S3-compatible servers; or `AMPHI__PACKAGER__STORAGE__ACCESS_KEY`).
    /// With neither it nor `secret_key` the AWS default credential chain is used (environment,
    /// profile, web identity, ECS, EC2 instance profile).
    #[serde(default)]
    pub access_key: Option<String>,
    /// Static secret access key, set together with `access_key` (or
    /// `AMPHI__PACKAGER__STORAGE__SECRET_KEY`).
    #[serde(default)]
    pub secret_key: Option<String>,
    /// Bytes of pending uploads kept in memory over all rooms (default 64 MiB). While
    /// storage is slow or down, uploads beyond it spill to `spill_dir`; nothing is dropped.
    #[serde(default)]
    pub upload_memory_budget_bytes: Option<usize>,
    /// Directory for uploads spilled beyond the memory budget (default `{data_dir}/spill`).
    /// Spill files a stopped or crashed packager left behind are uploaded at start.
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        f.debug_struct("StorageConfig")
            .field("backend", &self.backend)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<set>"))
            .field(
                "upload_memory_budget_bytes",
                &self.upload_memory_budget_bytes,
            )
            .field("spill_dir", &self.spill_dir)
            .finish()
    }
}

/// A storage backend kind.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `{data_dir}/hls/` on the local disk.
    #[default]
    Filesystem,
    /// An S3 bucket.
    S3,
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The key is not a canonical relative path.
    #[error("bad key {0:?}")]
    BadKey(String),
    /// Local IO failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The S3 service failed or could not be reached.
    #[error("s3: {0}")]
    S3(String),
    /// The configuration is unusable.
    #[error("storage config: {0}")]
    Config(String),
}

/// Object metadata sent with a put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `Content-Type`.
    pub content_type: &'static str,
    /// `Cache-Control`.
    pub cache_control: &'static str,
}

impl ObjectMeta {
    /// An immutable fMP4 object.
    pub const MEDIA: ObjectMeta = ObjectMeta {
        content_type: content_type::MEDIA,
        cache_control: IMMUTABLE,
    };
    /// A playlist.
    pub const PLAYLIST: ObjectMeta = ObjectMeta {
        content_type: content_type::PLAYLIST,
        cache_control: PLAYLIST_CACHE,
    };
    /// JSON metadata.
    pub const JSON: ObjectMeta = ObjectMeta {
        content_type: content_type::JSON,
        cache_control: "no-cache",
    };
    /// A chunk of the recording index (rewritten as segments complete).
    pub const INDEX: ObjectMeta = ObjectMeta {
        content_type: content_type::TEXT,
        cache_control: "no-cache",
    };
    /// A WebVTT track (the recording's chapters).
    pub const VTT: ObjectMeta = ObjectMeta {
        content_type: content_type::VTT,
        cache_control: "no-cache",
    };
}

impl ObjectMeta {
    /// The published recording's downloadable file (`recording.m4a`; stored directly, never
    /// spilled). Rewritten if the host publishes again, so not immutable.
    pub const DOWNLOAD: ObjectMeta = ObjectMeta {
        content_type: content_type::MEDIA,
        cache_control: "max-age=60",
    };

    const ALL: [(&'static str, ObjectMeta); 5] = [
        ("media", ObjectMeta::MEDIA),
        ("playlist", ObjectMeta::PLAYLIST),
        ("json", ObjectMeta::JSON),
        ("index", ObjectMeta::INDEX),
        ("vtt", ObjectMeta::VTT),
    ];

    /// A short name of this metadata (spill files).
    pub fn name(&self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| m.content_type == self.content_type)
            .map_or("media", |(n, _)| n)
    }

    /// The metadata named `name` by [`ObjectMeta::name`].
    pub fn from_name(name: &str) -> Option<ObjectMeta> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }
}

/// A key is a relative path of plain segments (letters, digits, `.`, `-`, `_`), never `..`.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
}

/// An object store.
pub trait Storage: Send + Sync + 'static {
    /// Store `body` under `key` (replacing it); readers never see a partial object.
    fn put(
        &self,
        key: &str,
        body: Bytes,
        meta: ObjectMeta,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// The object under `key`, if any.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, StorageError>> + Send;
    /// Remove `key` (absent is fine).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Every key under `prefix` (a directory-like prefix ending in `/`, or empty).
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send;
}

/// The local filesystem backend.
#[derive(Clone, Debug)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// Objects under `root`.
    pub fn new(root: PathBuf) -> Self {
        FsStore { root }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if !valid_key(key) {
            return Err(StorageError::BadKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }
}

impl Storage for FsStore {
    async fn put(&self, key: &str, body: Bytes, _meta: ObjectMeta) -> Result<(), StorageError> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StorageError::BadKey(key.to_string()))?;
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        tokio::fs::write(&tmp, &body).await?;
        tokio::fs::rename(&tmp, &path).await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.join(prefix.trim_end_matches('/'))];
        while let Some(dir) = dirs.pop() {
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(entry) = rd.next_entry().await? {
                let path = entry.path();
                if entry.file_type().await?.is_dir() {
                    dirs.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    if let Some(k) = rel.to_str() {
                        if valid_key(k) {
                            out.push(k.to_string());
                        }
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The S3 backend.
#[cfg(feature = "s3")]
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

#[cfg(feature = "s3")]
impl S3Store {
    /// A client for `config` (bucket, endpoint, region, path style). Credentials: the static
    /// `access_key` / `secret_key` pair when set (S3-compatible servers), otherwise the AWS
    /// default chain (environment, profile, web identity, ECS, EC2 instance profile), resolved
    /// and refreshed lazily on the first request.
    pub async fn new(config: &StorageConfig) -> Result<Self, StorageError> {
        use aws_sdk_s3::config::{
            BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
            ResponseChecksumValidation, SharedCredentialsProvider,
        };
        use aws_smithy_http_client::tls;
        if config.bucket.is_empty() {
            return Err(StorageError::Config(
                "storage.bucket is required for s3".into(),
            ));
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let region = Region::new(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
        let credentials = match (&config.access_key, &config.secret_key) {
            (Some(access), Some(secret)) => SharedCredentialsProvider::new(Credentials::new(
                access, secret, None, None, "static",
            )),
            (None, None) => {
                let provider = aws_config::provider_config::ProviderConfig::default()
                    .with_http_client(http.clone())
                    .with_region(Some(region.clone()));
                SharedCredentialsProvider::new(
                    aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .configure(provider)
                        .build()
                        .await,
                )
            }
            _ => {
                return Err(StorageError::Config(
                    "storage.access_key and storage.secret_key go together (neither: the AWS default credential chain)".into(),
                ))
            }
        };
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(region)
            .credentials_provider(credentials)
            .force_path_style(config.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(2))
                    .operation_attempt_timeout(std::time::Duration::from_secs(10))
                    .build(),
            )
            // The uploader retries with its own backoff and keeps order; one attempt here.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
        if let Some(ep) = &config.endpoint {
            b = b.endpoint_url(ep);
        }
        let prefix = config
            .prefix
            .clone()
            .unwrap_or_else(|| "hls".into())
            .trim_matches('/')
            .to_string();
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: config.bucket.clone(),
            prefix,
        })
    }

    fn key(&self, key: &str) -> Result<String, StorageError> {
        if !valid_key(key) {
            return Err(StorageError::BadKey(key.to_string()));
        }
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    /// The names directly under the configured prefix (`/`-delimited common prefixes).
    pub async fn top_level(&self) -> Result<Vec<String>, StorageError> {
        let full = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = Vec::new();
        self.each_page(&full, Some("/"), |page| {
            for p in page.common_prefixes() {
                if let Some(name) = p.prefix().and_then(|p| p.strip_prefix(full.as_str())) {
                    out.push(name.trim_end_matches('/').to_string());
                }
            }
        })
        .await?;
        Ok(out)
    }

    /// Call `each` with every page of `ListObjectsV2` under `prefix` (the full key prefix),
    /// grouped by `delimiter` if given.
    async fn each_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        mut each: impl FnMut(&aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output),
    ) -> Result<(), StorageError> {
        let mut token = None;
        for _ in 0..100_000 {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(s3_err)?;
            each(&page);
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Create the bucket if it does not exist (dev and tests).
    pub async fn ensure_bucket(&self) -> Result<(), StorageError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| StorageError::S3(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
        Ok(())
    }
}

#[cfg(feature = "s3")]
fn s3_err<E: std::error::Error + Send + Sync + 'static>(
    e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StorageError {
    StorageError::S3(aws_sdk_s3::error::DisplayErrorContext(e).to_string())
}

#[cfg(feature = "s3")]
impl Storage for S3Store {
    async fn put(&self, key: &str, body: Bytes, meta: ObjectMeta) -> Result<(), StorageError> {
        let key = self.key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(meta.content_type)
            .cache_control(meta.cache_control)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .map_err(s3_err)?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let key = self.key(key)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let body = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| StorageError::S3(e.to_string()))?;
                Ok(Some(body.into_bytes()))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(s3_err(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let key = self.key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(s3_err)?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let full = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        self.each_page(&full, None, |page| {
            for o in page.contents() {
                if let Some(k) = o.key() {
                    if k.len() > strip {
                        out.push(k[strip..].to_string());
                    }
                }
            }
        })
        .await?;
        out.sort();
        Ok(out)
    }
}

/// The configured backend.
#[derive(Clone, Debug)]
pub enum Store {
    /// Local filesystem.
    Fs(FsStore),
    /// S3.
    #[cfg(feature = "s3")]
    S3(S3Store),
}

impl Store {
    /// Open the backend `config` names; the filesystem backend stores under `{data_dir}/hls`.
    pub async fn open(config: &StorageConfig, data_dir: &Path) -> Result<Store, StorageError> {
        match config.backend {
            Backend::Filesystem => {
                let root = data_dir.join("hls");
                tokio::fs::create_dir_all(&root).await?;
                Ok(Store::Fs(FsStore::new(root)))
            }
            #[cfg(feature = "s3")]
            Backend::S3 => {
                let s3 = S3Store::new(config).await?;
                if let Err(e) = s3.ensure_bucket().await {
                    tracing::warn!(error = %e, bucket = %config.bucket, "cannot check or create the bucket (yet)");
                }
                Ok(Store::S3(s3))
            }
            #[cfg(not(feature = "s3"))]
            Backend::S3 => Err(StorageError::Config(
                "this build has no S3 support (cargo feature `s3`)".into(),
            )),
        }
    }

    /// The top-level names of the store (the rooms with anything stored): the filesystem's
    /// directories under its root, S3's common prefixes under the configured prefix. One
    /// listing per 1,000 rooms, whatever the number of objects.
    pub async fn top_level(&self) -> Result<Vec<String>, StorageError> {
        match self {
            Store::Fs(s) => {
                let mut out = Vec::new();
                let mut rd = match tokio::fs::read_dir(s.root()).await {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(e.into()),
                };
                while let Some(entry) = rd.next_entry().await? {
                    if entry.file_type().await?.is_dir() {
                        if let Some(name) = entry.file_name().to_str() {
                            out.push(name.to_string());
                        }
                    }
                }
                Ok(out)
            }
            #[cfg(feature = "s3")]
            Store::S3(s) => s.top_level().await,
        }
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Fs(_) => "filesystem",
            #[cfg(feature = "s3")]
            Store::S3(_) => "s3",
        }
    }
}

impl Storage for Store {
    async fn put(&self, key: &str, body: Bytes, meta: ObjectMeta) -> Result<(), StorageError> {
        match self {
            Store::Fs(s) => s.put(key, body, meta).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.put(key, body, meta).await,
        }
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        match self {
            Store::Fs(s) => s.get(key).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.get(key).await,
        }
    }
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self {
            Store::Fs(s) => s.delete(key).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.delete(key).await,
        }
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        match self {
            Store::Fs(s) => s.list(prefix).await,
            #[cfg(feature = "s3")]
            Store::S3(s) => s.list(prefix).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_plain_relative_paths() {
        for ok in ["0123/opus/part1.2.m4s", "a/index.m3u8", "x"] {
            assert!(valid_key(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs",
            "a/../b",
            "a//b",
            "a/./b",
            "a/.hidden",
            "a b",
            "a/b%2f",
            "..",
            "a/",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn filesystem_round_trip_list_delete() {
        let dir = std::env::temp_dir().join(format!("amphi-fsstore-{}", std::process::id()));
        let s = FsStore::new(dir.clone());
        s.put(
            "r/opus/a.m4s",
            Bytes::from_static(b"abc"),
            ObjectMeta::MEDIA,
        )
        .await
        .unwrap();
        s.put(
            "r/index.m3u8",
            Bytes::from_static(b"#EXTM3U\n"),
            ObjectMeta::PLAYLIST,
        )
        .await
        .unwrap();
        assert_eq!(s.get("r/opus/a.m4s").await.unwrap().unwrap(), &b"abc"[..]);
        assert_eq!(s.get("r/opus/b.m4s").await.unwrap(), None);
        assert_eq!(
            s.list("r/").await.unwrap(),
            vec!["r/index.m3u8", "r/opus/a.m4s"]
        );
        s.delete("r/opus/a.m4s").await.unwrap();
        s.delete("r/opus/a.m4s").await.unwrap();
        assert_eq!(s.list("").await.unwrap(), vec!["r/index.m3u8"]);
        assert!(matches!(
            s.get("../etc/passwd").await,
            Err(StorageError::BadKey(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn debug_hides_credentials() {
        let c = StorageConfig {
            backend: Backend::S3,
            access_key: Some("AKIDSECRET".into()),
            secret_key: Some("verysecret".into()),
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(
            !d.contains("AKIDSECRET") && !d.contains("verysecret"),
            "{d}"
        );
    }
}
