//! HTTPS for every role, in one place: the HTTP client the roles use to talk to each other
//! (edge -> geo-router, geo-router -> packager, webhooks), and the TLS listener the edge,
//! geo-router and packager serve their axum routers on.
//!
//! Both use rustls with the ring provider. Clients speak `https://` and `http://`, trust the
//! system roots (`rustls-native-certs`, which honours `SSL_CERT_FILE`) plus an optional extra CA
//! bundle from the role's config ([`crate::config::HttpTls::tls_ca`]), and offer HTTP/2 and
//! HTTP/1.1 by ALPN. Listeners offer `h2` and `http/1.1`; WebSocket upgrades work over both
//! HTTP/1.1 and TLS.

use crate::config::HttpLimits;
use crate::limits::{IpBudgets, LimitsError, Refusal};
use amphi_common::metrics::LimiterMetrics;
use axum::extract::ConnectInfo;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_layer::Layer;

/// The roles' HTTP client: `http://` and `https://` (rustls, ring), HTTP/2 and HTTP/1.1.
pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn pem_error(path: &Path, reason: impl std::fmt::Display) -> HttpsError {
    HttpsError::Pem {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, HttpsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client TLS config: system roots plus the certificates of `extra_ca` (PEM); no ALPN (the
/// client sets `h2` and `http/1.1`). Unreadable system roots are logged and skipped; an
/// unreadable `extra_ca` is an error.
pub fn client_tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, HttpsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "some system root certificates could not be loaded");
    }
    let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| pem_error(path, e))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The system roots plus the certificates of `extra_ca`, as one PEM bundle: for TLS clients
/// that take a root bundle instead of a rustls config (the geo-router's Redis client).
pub fn root_bundle_pem(extra_ca: Option<&Path>) -> Result<Vec<u8>, HttpsError> {
    use base64::Engine;
    let native = rustls_native_certs::load_native_certs();
    let mut ders: Vec<CertificateDer<'static>> = native.certs;
    if let Some(path) = extra_ca {
        ders.extend(read_certs(path)?);
    }
    let mut pem = String::new();
    for der in &ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(pem.into_bytes())
}

/// An HTTP client for `http://` and `https://` URLs trusting the system roots plus `extra_ca`.
pub fn client<B>(extra_ca: Option<&Path>) -> Result<HttpsClient<B>, HttpsError>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Ok(client_with(client_tls_config(extra_ca)?))
}

/// An HTTP client with a ready TLS config (see [`client_tls_config`]); TCP_NODELAY on.
pub fn client_with<B>(tls: rustls::ClientConfig) -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A TLS acceptor for an HTTP listener from a PEM certificate chain and key, offering `h2` and
/// `http/1.1` by ALPN.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, HttpsError> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
    acceptor_from(certs, key)
}

/// [`acceptor`] from certificate and key already in memory.
pub fn acceptor_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, HttpsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| HttpsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection is given to finish its requests after shutdown.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Longest a client may take to send a complete request head: counted from the accepted
/// connection (or the TLS handshake) to its first request, and from the end of each HTTP/1.1
/// request to the next head. A slow-loris client is cut off after this; real clients send a
/// head in one packet.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A role's per-client-address budgets ([`crate::limits::IpBudgets`]) shared by its listeners
/// and request handlers; cheap to clone.
#[derive(Clone, Debug)]
pub struct Limiter {
    budgets: Arc<std::sync::Mutex<IpBudgets>>,
    /// Clients no request budget applies to, told without the budgets' lock.
    unmetered: crate::limits::UnmeteredRequests,
    metrics: LimiterMetrics,
}

/// A connection counted against its address's budget until dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limiter: Limiter,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limiter
            .lock()
            .close(self.ip, std::time::Instant::now());
    }
}

impl Limiter {
    /// Budgets from `cfg`, counting refusals in `metrics`.
    pub fn new(cfg: &HttpLimits, metrics: LimiterMetrics) -> Result<Limiter, LimitsError> {
        let budgets = IpBudgets::new(cfg)?;
        Ok(Limiter {
            unmetered: budgets.unmetered_requests(),
            budgets: Arc::new(std::sync::Mutex::new(budgets)),
            metrics,
        })
    }

    /// No budget at all (internal listeners, tests).
    pub fn unlimited() -> Limiter {
        let off = HttpLimits {
            max_connections_per_ip: 0,
            requests_per_second_per_ip: 0,
            request_burst_per_ip: 0,
            rate_limit_exempt: Vec::new(),
        };
        Limiter::new(&off, LimiterMetrics::default()).expect("an empty configuration is valid")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IpBudgets> {
        self.budgets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a connection accepted from `peer`, or refuse it over the cap.
    pub fn connection(&self, peer: IpAddr) -> Result<ConnectionPermit, Refusal> {
        let r = self.lock().open(peer, std::time::Instant::now());
        match r {
            Ok(()) => Ok(ConnectionPermit {
                limiter: self.clone(),
                ip: peer,
            }),
            Err(e) => {
                self.metrics.connections_refused.inc();
                Err(e)
            }
        }
    }

    /// Spend one request of `client`'s budget (the real client address), or refuse it.
    pub fn request(&self, client: IpAddr) -> Result<(), Refusal> {
        self.request_at(client, std::time::Instant::now())
    }

    /// [`Limiter::request`] at `now` (a caller that already read the clock).
    pub fn request_at(&self, client: IpAddr, now: std::time::Instant) -> Result<(), Refusal> {
        if self.unmetered.contains(client) {
            return Ok(());
        }
        let r = self.lock().request(client, now);
        if r.is_err() {
            self.metrics.rate_limited.inc();
        }
        r
    }

    /// Whether `ip` is exempt from every budget (a trusted proxy, a CDN, loopback).
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.lock().is_exempt(ip)
    }
}

/// The JSON body of a refusal (`{"error": code, "message": ...}`).
fn refusal_body(r: &Refusal) -> Vec<u8> {
    serde_json::to_vec(&crate::api::ApiError::new(r.code(), r.message())).unwrap_or_default()
}

/// The answer to a refused request: 429 or 503, JSON body, `Retry-After`.
pub fn refusal_response(r: &Refusal) -> axum::response::Response {
    let mut resp = axum::response::Response::new(axum::body::Body::from(refusal_body(r)));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(r.status()).unwrap_or(hyper::StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    h.insert(hyper::header::RETRY_AFTER, r.retry_after_secs().into());
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// The whole HTTP/1.1 answer to a refused connection or request (`Connection: close`), for
/// listeners that write bytes themselves.
pub fn refusal_bytes(r: &Refusal) -> Vec<u8> {
    let body = refusal_body(r);
    let reason = hyper::StatusCode::from_u16(r.status())
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\nretry-after: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        r.status(),
        r.retry_after_secs(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// `app` with every request spent from the budget of the connection's peer address
/// ([`ConnectInfo`], set by [`serve_connection`]); refused requests get [`refusal_response`].
pub fn limit_requests_by_peer(app: axum::Router, limiter: Limiter) -> axum::Router {
    app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let limiter = limiter.clone();
            async move {
                let peer = req
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip());
                if let Some(Err(r)) = peer.map(|ip| limiter.request(ip)) {
                    return refusal_response(&r);
                }
                next.run(req).await
            }
        },
    ))
}

/// Accept connections on `listener` until `shutdown`, running `conn` on each accepted socket
/// (TCP_NODELAY on) that `limiter` admits; a refused plain connection is answered
/// [`refusal_bytes`] (a TLS one is closed), without reading from it. Returns once every
/// connection task has ended.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    limiter: Limiter,
    plain: bool,
    conn: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let permit = match limiter.connection(peer.ip()) {
            Ok(p) => p,
            Err(r) => {
                tracing::debug!(%peer, "connection refused: too many from this address");
                if plain {
                    // Best effort, never waiting: the client may not be reading.
                    let _ = tcp.try_write(&refusal_bytes(&r));
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let fut = conn(tcp, peer);
        tracker.spawn(async move {
            fut.await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// What [`serve_connection_with`] serves on one connection: a hyper service answering axum
/// responses (an [`axum::Router`] through [`app_service`], or a role's own front service with
/// a fast path below its router).
pub trait ConnectionService:
    hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<T> ConnectionService for T where
    T: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// `app` as the service of one connection from `peer`: every request carries
/// [`ConnectInfo`]`<SocketAddr>`.
pub fn app_service(app: axum::Router, peer: SocketAddr) -> impl ConnectionService + Clone {
    hyper_util::service::TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(app))
}

/// Accept TLS connections on `listener` until `shutdown` (at most `limiter`'s connections per
/// client address), serving `app` on each (HTTP/2 or
/// HTTP/1.1 by ALPN, with upgrades); requests carry [`ConnectInfo`]`<SocketAddr>` of the peer.
/// Returns once every connection has ended (each is given [`SHUTDOWN_GRACE`] after shutdown).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    app: axum::Router,
    shutdown: CancellationToken,
    limiter: Limiter,
) {
    serve_tls_with(
        listener,
        acceptor,
        move |peer| app_service(app.clone(), peer),
        shutdown,
        limiter,
    )
    .await;
}

/// [`serve_tls`] with the service of each connection made by `make` from its peer address.
pub async fn serve_tls_with<M, S>(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    make: M,
    shutdown: CancellationToken,
    limiter: Limiter,
) where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService,
{
    let sd = shutdown.clone();
    accept_loop(listener, shutdown, limiter, false, move |tcp, peer| {
        let acceptor = acceptor.clone();
        let svc = make(peer);
        let sd = sd.clone();
        async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            serve_connection_with(tls, svc, peer, &sd).await;
        }
    })
    .await;
}

/// Accept plain TCP connections on `listener` until `shutdown` (at most `limiter`'s connections
/// per client address), serving `app` on each like
/// [`serve_tls`] does (HTTP/1.1 or HTTP/2 prior knowledge, upgrades, [`ConnectInfo`], header
/// read timeout, shutdown grace).
pub async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
    limiter: Limiter,
) {
    serve_plain_with(
        listener,
        move |peer| app_service(app.clone(), peer),
        shutdown,
        limiter,
    )
    .await;
}

/// [`serve_plain`] with the service of each connection made by `make` from its peer address.
pub async fn serve_plain_with<M, S>(
    listener: tokio::net::TcpListener,
    make: M,
    shutdown: CancellationToken,
    limiter: Limiter,
) where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService,
{
    let sd = shutdown.clone();
    accept_loop(listener, shutdown, limiter, true, move |tcp, peer| {
        let svc = make(peer);
        let sd = sd.clone();
        async move { serve_connection_with(tcp, svc, peer, &sd).await }
    })
    .await;
}

/// Serve one accepted connection (plain or TLS) with `app`: HTTP/1.1 or HTTP/2, upgrades allowed,
/// [`ConnectInfo`] of `peer` on every request; on `shutdown` it is closed gracefully within
/// [`SHUTDOWN_GRACE`]. A connection whose first request has not arrived within
/// [`HEADER_READ_TIMEOUT`] is dropped (this covers the HTTP version sniffing and the HTTP/2
/// preface), and hyper drops an HTTP/1.1 connection whose next head takes longer.
pub async fn serve_connection<S>(
    io: S,
    app: axum::Router,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_with(io, app_service(app, peer), peer, shutdown).await;
}

/// [`serve_connection`] with any [`ConnectionService`] (the same HTTP versions, timeouts and
/// shutdown grace).
pub async fn serve_connection_with<S, Svc>(
    io: S,
    svc: Svc,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Svc: ConnectionService,
{
    let first = Arc::new(tokio::sync::Notify::new());
    let seen = first.clone();
    let svc = hyper::service::service_fn(move |req| {
        seen.notify_one();
        svc.call(req)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let first_deadline = tokio::time::sleep(HEADER_READ_TIMEOUT);
    tokio::pin!(first_deadline);
    let mut started = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = first.notified(), if !started => started = true,
            _ = first_deadline.as_mut(), if !started => {
                tracing::debug!(%peer, "no request head within the header read timeout");
                return;
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Behave as a slow-loris client on `s` (silent, or dripping an endless request head one
    /// byte a second) until the server closes it; returns how long that took.
    async fn cut_off<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, drip: bool) -> Duration {
        let start = tokio::time::Instant::now();
        let mut head = b"GET / HTTP/1.1\r\nHost: localhost\r\n"
            .iter()
            .copied()
            .chain(std::iter::repeat(b"X-Slow: a\r\n".iter().copied()).flatten());
        let mut buf = [0u8; 1024];
        let wait = async {
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return start.elapsed(),
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let byte = [head.next().expect("endless")];
                        if drip && s.write_all(&byte).await.is_err() {
                            return start.elapsed();
                        }
                    }
                }
            }
        };
        tokio::time::timeout(HEADER_READ_TIMEOUT * 6, wait)
            .await
            .expect("a slow-loris connection was never cut off")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_heads_are_cut_off_on_tls_and_plain_listeners_while_requests_work() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let acceptor = acceptor_from(
            vec![ck.cert.der().clone()],
            PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
        )
        .unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let sd = CancellationToken::new();
        let tls_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tls_addr, plain_addr) = (tls_l.local_addr().unwrap(), plain_l.local_addr().unwrap());
        let servers = [
            tokio::spawn(serve_tls(
                tls_l,
                acceptor,
                app.clone(),
                sd.clone(),
                Limiter::unlimited(),
            )),
            tokio::spawn(serve_plain(plain_l, app, sd.clone(), Limiter::unlimited())),
        ];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()));
        let mut attacks = tokio::task::JoinSet::new();
        for drip in [false, true] {
            let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let stream = connector.connect(name, tcp).await.unwrap();
            attacks.spawn(async move { ("tls", drip, cut_off(stream, drip).await) });
            let tcp = tokio::net::TcpStream::connect(plain_addr).await.unwrap();
            attacks.spawn(async move { ("plain", drip, cut_off(tcp, drip).await) });
        }
        // Real requests are answered on both listeners while the attacks run.
        let client: HttpsClient<String> = client_with(tls);
        for url in [
            format!("https://localhost:{}/", tls_addr.port()),
            format!("http://127.0.0.1:{}/", plain_addr.port()),
        ] {
            let uri: axum::http::Uri = url.parse().unwrap();
            let resp = client.get(uri).await.unwrap();
            assert_eq!(resp.status(), 200, "{url}");
        }
        while let Some(r) = attacks.join_next().await {
            let (listener, drip, after) = r.unwrap();
            // Cut off, and not before the timeout: real clients get the whole bound.
            assert!(
                after >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
                "{listener} {drip}: {after:?}"
            );
        }
        sd.cancel();
        for s in servers {
            s.await.unwrap();
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn extra_ca_and_listener_material_load_or_fail_clearly() {
        let dir = std::env::temp_dir().join(format!("amphi-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(&dir, "cert.pem", &ck.cert.pem());
        let key = write(&dir, "key.pem", &ck.key_pair.serialize_pem());
        let _client: HttpsClient<String> = client(Some(&cert)).unwrap();
        acceptor(&cert, &key).unwrap();
        // The bundle ends with the extra CA, re-encoded to the same DER.
        let bundle = root_bundle_pem(Some(&cert)).unwrap();
        let last = CertificateDer::pem_slice_iter(&bundle)
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(last, *ck.cert.der());

        let empty = write(&dir, "empty.pem", "");
        let err = client_tls_config(Some(&empty)).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no certificate"),
            "{err}"
        );
        assert!(client_tls_config(Some(&dir.join("missing.pem"))).is_err());
        // A key that is not the certificate's.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let wrong = write(&dir, "wrong.pem", &other.key_pair.serialize_pem());
        assert!(matches!(
            acceptor(&cert, &wrong),
            Err(HttpsError::Config(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
