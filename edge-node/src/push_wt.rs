//! Push listeners over WebTransport (HTTP/3 over QUIC, `[edge.webtransport]`):
//! `CONNECT https://{edge}:{port}/v1/rooms/{room}/push?token=...[&after=TS]`. The session
//! passes the WebSocket's checks ([`push_ws::admit`](crate::push_ws::admit)) and is refused
//! with their status; accepted, it gets one unidirectional stream carrying the bytes a
//! WebSocket listener gets (RFC 6455 server frames: the room header, audio messages, a close
//! frame when the room ends), written by the same writers (`push_fanout`), so nothing is
//! encoded per listener or per transport.
//!
//! Without a configured certificate the edge makes its own (ECDSA P-256, valid
//! [`OWN_CERT_VALIDITY`], renewed every [`OWN_CERT_RENEWAL`]) and the router hands its SHA-256
//! to clients, which pin it with `serverCertificateHashes` (browsers accept that only for
//! certificates valid at most 14 days).

use crate::admission::AppState;
use crate::push_hub::Reservation;
use crate::push_io::{PushIo, WebTransportListener};
use crate::push_ws::{admit, refused_place, PushQuery};
use amphi_protocol::api::WebTransportEndpoint;
use amphi_protocol::config::WebTransportConfig;
use amphi_protocol::https::{ConnectionPermit, Limiter};
use axum::http::StatusCode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Digest;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Total validity of the edge's own certificate (browsers pin hashes of certificates valid
/// at most 14 days).
pub const OWN_CERT_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);
/// How often the edge's own certificate is replaced (the router's answers carry the new hash
/// from the next heartbeat on).
pub const OWN_CERT_RENEWAL: Duration = Duration::from_secs(6 * 24 * 3600);
/// The own certificate's start is set this far back, for clients whose clocks are behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// How long a refused session's connection is kept for its response to leave.
const LINGER: Duration = Duration::from_secs(2);
/// Receive and send buffer of the listener's UDP socket: every listener's ACKs arrive on it, and
/// with the kernel's default (~208 KB) 2,000 listeners overflowed it (tens of thousands of drops
/// in 15 s, `amphi-tools loadgen push --transport webtransport`).
const SOCKET_BUFFER: usize = 4 << 20;
/// A session that has not sent its CONNECT request by then is dropped (QUIC idle timeout).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the WebTransport listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebTransportError {
    /// The certificate or key could not be read or used.
    #[error("webtransport certificate: {0}")]
    Certificate(String),
    /// The UDP socket could not be bound.
    #[error("webtransport listen {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// No base URL: `public_url` unset and the edge's `public_url` has no host.
    #[error("webtransport: set public_url (the edge's public_url has no host)")]
    NoUrl,
}

/// A certificate chain and key for the listener, with the SHA-256 clients pin when it is the
/// edge's own.
struct ListenerCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    sha256: Option<String>,
}

/// The edge's own certificate for `host` (an IP address or DNS name), valid from `now - 1 h`
/// for [`OWN_CERT_VALIDITY`].
fn own_certificate(host: &str, now: time::OffsetDateTime) -> Result<ListenerCert, String> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
    params.not_before = now - BACKDATE;
    params.not_after = params.not_before + OWN_CERT_VALIDITY;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = cert.der().clone();
    let sha256 = hex::encode(sha2::Sha256::digest(&der));
    Ok(ListenerCert {
        chain: vec![der],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        sha256: Some(sha256),
    })
}

/// A configured certificate chain and key (PEM files).
fn configured_certificate(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<ListenerCert, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(ListenerCert {
        chain,
        key,
        sha256: None,
    })
}

/// The QUIC server configuration for `cert`: TLS 1.3, HTTP/3 by ALPN.
fn server_config(cert: ListenerCert) -> Result<quinn::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(cert.chain, cert.key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![web_transport_quinn::ALPN.as_bytes().to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .map_err(|_| "idle timeout".to_string())?,
    ));
    // A client opens its HTTP/3 control and QPACK streams (3); listeners open no others.
    transport.max_concurrent_uni_streams(8u8.into());
    transport.max_concurrent_bidi_streams(4u8.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The listener's UDP socket at `addr`, with [`SOCKET_BUFFER`] bytes of receive and send buffer
/// (the kernel caps them at `net.core.rmem_max` / `wmem_max`).
fn udp_socket(addr: std::net::SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer still works, it only drops more under load.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The base URL browsers connect to: the configured one, else `https://{host of the edge's
/// public_url}:{listen port}`.
fn base_url(config: &WebTransportConfig, edge_public_url: &str) -> Option<String> {
    if let Some(url) = &config.public_url {
        return Some(url.trim_end_matches('/').to_string());
    }
    let uri: axum::http::Uri = edge_public_url.parse().ok()?;
    let host = uri.host()?;
    Some(format!("https://{host}:{}", config.listen.port()))
}

/// The host a certificate must name for `base` (`https://host:port`), brackets of an IPv6
/// address removed.
fn cert_host(base: &str) -> Option<String> {
    let uri: axum::http::Uri = base.parse().ok()?;
    let host = uri.host()?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

/// The WebTransport listener: its endpoint, where it is, and how to renew its certificate.
pub(crate) struct WebTransportServer {
    server: web_transport_quinn::Server,
    /// Where clients connect and what they pin (read by the heartbeat).
    advertised: watch::Sender<Option<WebTransportEndpoint>>,
    /// The host the edge's own certificates name (`None`: a configured certificate).
    own_cert_host: Option<String>,
    limiter: Limiter,
}

impl WebTransportServer {
    /// Bind `config.listen` with the configured certificate or the edge's own; the receiver
    /// tells the heartbeat where the listener is and its certificate's hash.
    pub(crate) fn bind(
        config: &WebTransportConfig,
        edge_public_url: &str,
        limiter: Limiter,
    ) -> Result<(Self, watch::Receiver<Option<WebTransportEndpoint>>), WebTransportError> {
        let url = base_url(config, edge_public_url).ok_or(WebTransportError::NoUrl)?;
        let (cert, own_cert_host) = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => (configured_certificate(cert, key), None),
            (None, None) => {
                let host = cert_host(&url).ok_or(WebTransportError::NoUrl)?;
                (
                    own_certificate(&host, time::OffsetDateTime::now_utc()),
                    Some(host),
                )
            }
            _ => {
                return Err(WebTransportError::Certificate(
                    "cert and key go together".into(),
                ))
            }
        };
        let cert = cert.map_err(WebTransportError::Certificate)?;
        let sha256 = cert.sha256.clone();
        let server_config = server_config(cert).map_err(WebTransportError::Certificate)?;
        let bind_error = |source| WebTransportError::Bind {
            addr: config.listen,
            source,
        };
        let socket = udp_socket(config.listen).map_err(bind_error)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_error)?;
        let (advertised, rx) = watch::channel(Some(WebTransportEndpoint {
            url,
            cert_sha256: sha256,
        }));
        Ok((
            WebTransportServer {
                server: web_transport_quinn::Server::new(endpoint),
                advertised,
                own_cert_host,
                limiter,
            },
            rx,
        ))
    }

    /// Accept sessions until `shutdown`, renewing the edge's own certificate on time.
    pub(crate) async fn run(mut self, st: Arc<AppState>, shutdown: CancellationToken) {
        let mut renew = tokio::time::interval_at(
            tokio::time::Instant::now() + OWN_CERT_RENEWAL,
            OWN_CERT_RENEWAL,
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = renew.tick(), if self.own_cert_host.is_some() => self.renew(),
                request = self.server.accept() => {
                    let Some(request) = request else { break };
                    let (st, limiter) = (st.clone(), self.limiter.clone());
                    tokio::spawn(async move { serve(st, limiter, request).await });
                }
            }
        }
        self.server.close(0u8.into(), b"edge stopping");
    }

    /// Replace the edge's own certificate (sessions already open keep theirs).
    fn renew(&mut self) {
        let Some(host) = &self.own_cert_host else {
            return;
        };
        let renewed = own_certificate(host, time::OffsetDateTime::now_utc()).and_then(|cert| {
            let sha256 = cert.sha256.clone();
            Ok((server_config(cert)?, sha256))
        });
        match renewed {
            Ok((config, sha256)) => {
                self.server.set_server_config(Some(config));
                self.advertised.send_modify(|a| {
                    if let Some(a) = a {
                        a.cert_sha256 = sha256;
                    }
                });
                tracing::info!("webtransport certificate renewed");
            }
            Err(e) => tracing::error!(error = %e, "webtransport certificate not renewed"),
        }
    }
}

/// One session request: [`admission`], then the stream.
async fn serve(st: Arc<AppState>, limiter: Limiter, request: web_transport_quinn::Request) {
    let peer = request.conn().remote_address();
    let (permit, place, after) = match admission(&st, &limiter, &request).await {
        Ok(admitted) => admitted,
        Err(status) => {
            // The connection is kept until the client read the refusal and closed (or for
            // LINGER): dropping it at once would close it before the response leaves.
            let conn = request.conn().clone();
            if let Err(e) = request.reject(status).await {
                tracing::debug!(%peer, error = %e, "webtransport refusal not sent");
            }
            let _ = tokio::time::timeout(LINGER, conn.closed()).await;
            return;
        }
    };
    let session = match request.ok().await {
        Ok(session) => session,
        Err(e) => return tracing::debug!(%peer, error = %e, "webtransport session not opened"),
    };
    let send = match session.open_uni().await {
        Ok(send) => send,
        Err(e) => return tracing::debug!(%peer, error = %e, "webtransport stream not opened"),
    };
    st.metrics.push_webtransport_sessions.inc();
    let listener = WebTransportListener::new(session, send, permit);
    st.push
        .attach(place, PushIo::WebTransport(Box::new(listener)), after);
}

/// The client address's budgets, the path, the push checks and a place; refused with the
/// status a WebSocket request would get.
async fn admission(
    st: &AppState,
    limiter: &Limiter,
    request: &web_transport_quinn::Request,
) -> Result<(ConnectionPermit, Reservation, Option<u64>), StatusCode> {
    let ip = request.conn().remote_address().ip();
    let permit = limiter
        .connection(ip)
        .and_then(|permit| limiter.request(ip).map(|()| permit))
        .map_err(|_| StatusCode::TOO_MANY_REQUESTS)?;
    let target = push_target(&request.url).map_err(|e| match e {
        BadPushUrl::NotFound => StatusCode::NOT_FOUND,
        BadPushUrl::BadAfter => StatusCode::BAD_REQUEST,
    })?;
    let query = PushQuery {
        token: target.token,
        relay: target.relay,
        after: target.after,
    };
    let room = admit(st, target.room, &query, &request.headers)
        .await
        .map_err(|refusal| refusal.status())?;
    let place = st
        .push
        .reserve(room)
        .map_err(|refusal| refused_place(refusal).status())?;
    Ok((permit, place, query.after))
}

/// What a push session's URL asks for: `/v1/rooms/{room}/push?token=..&relay=..&after=..`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PushTarget<'a> {
    /// The room path segment, as sent (checked as a room id by the push checks).
    pub room: &'a str,
    /// `token=`: the listener's room token.
    pub token: Option<String>,
    /// `relay=`: another edge's relay grant.
    pub relay: Option<String>,
    /// `after=`: resume after this room timestamp.
    pub after: Option<u64>,
}

/// Why a push session's URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPushUrl {
    /// Not `/v1/rooms/{room}/push` (404).
    #[error("not a push stream path")]
    NotFound,
    /// `after` is not a number (400).
    #[error("after is not a room timestamp")]
    BadAfter,
}

/// Parse a push session's URL (never panics; fuzzed: `fuzz/fuzz_targets/push_session_url.rs`).
pub fn push_target(url: &url::Url) -> Result<PushTarget<'_>, BadPushUrl> {
    let room = url
        .path()
        .strip_prefix("/v1/rooms/")
        .and_then(|rest| rest.strip_suffix("/push"))
        .filter(|room| !room.is_empty() && !room.contains('/'))
        .ok_or(BadPushUrl::NotFound)?;
    let mut target = PushTarget {
        room,
        ..PushTarget::default()
    };
    for (name, value) in url.query_pairs() {
        match &*name {
            "token" => target.token = Some(value.into_owned()),
            "relay" => target.relay = Some(value.into_owned()),
            "after" => target.after = Some(value.parse().map_err(|_| BadPushUrl::BadAfter)?),
            _ => {}
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<PushTarget<'static>, BadPushUrl> {
        let url: &'static url::Url = Box::leak(Box::new(url::Url::parse(url).unwrap()));
        push_target(url)
    }

    #[test]
    fn push_paths_name_one_room() {
        assert_eq!(
            target("https://e/v1/rooms/00000000000000ab/push").map(|t| t.room),
            Ok("00000000000000ab")
        );
        for path in [
            "/v1/rooms//push",
            "/v1/rooms/a/b/push",
            "/v1/ws",
            "/v1/rooms/00000000000000ab/push/x",
        ] {
            assert_eq!(
                target(&format!("https://e{path}")),
                Err(BadPushUrl::NotFound),
                "{path}"
            );
        }
    }

    #[test]
    fn the_query_carries_token_relay_and_a_numeric_after() {
        let t = target("https://e:4433/v1/rooms/ab/push?token=t%2Bk&after=960&x=1").unwrap();
        assert_eq!(t.token.as_deref(), Some("t+k"));
        assert_eq!(t.after, Some(960));
        assert!(t.relay.is_none());
        assert_eq!(
            target("https://e:4433/v1/rooms/ab/push?after=soon"),
            Err(BadPushUrl::BadAfter)
        );
    }

    #[test]
    fn the_base_url_defaults_to_the_public_host_and_the_listen_port() {
        let config = WebTransportConfig {
            listen: "0.0.0.0:4433".parse().unwrap(),
            public_url: None,
            cert: None,
            key: None,
        };
        assert_eq!(
            base_url(&config, "https://edge-1.example.com").as_deref(),
            Some("https://edge-1.example.com:4433")
        );
        assert_eq!(
            base_url(&config, "http://127.0.0.1:8080").as_deref(),
            Some("https://127.0.0.1:4433")
        );
        assert_eq!(
            cert_host("https://[::1]:4433").as_deref(),
            Some("::1"),
            "an IPv6 host is named without brackets"
        );
        let set = WebTransportConfig {
            public_url: Some("https://wt.example.com/".into()),
            ..config
        };
        assert_eq!(
            base_url(&set, "http://x").as_deref(),
            Some("https://wt.example.com")
        );
    }

    /// A client pinning `sha256` opens a session at `server` (which accepts one).
    async fn pinned_session(server: &mut WebTransportServer, sha256: &str) -> bool {
        let port = server.server.local_addr().unwrap().port();
        let client = web_transport_quinn::ClientBuilder::new()
            .with_server_certificate_hashes(vec![hex::decode(sha256).unwrap()])
            .unwrap();
        let url = url::Url::parse(&format!("https://127.0.0.1:{port}/v1/rooms/ab/push")).unwrap();
        let accept = async {
            if let Some(request) = server.server.accept().await {
                let _ = request.ok().await;
            }
        };
        tokio::select! {
            connected = client.connect(url) => connected.is_ok(),
            _ = async {
                accept.await;
                std::future::pending::<()>().await
            } => unreachable!(),
            _ = tokio::time::sleep(Duration::from_secs(5)) => false,
        }
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_served_and_advertised_and_the_old_pin_fails() {
        let config = WebTransportConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: Some("https://127.0.0.1:4433".into()),
            cert: None,
            key: None,
        };
        let (mut server, advertised) =
            WebTransportServer::bind(&config, "http://127.0.0.1:1", Limiter::unlimited()).unwrap();
        let first = advertised.borrow().clone().unwrap();
        assert_eq!(first.url, "https://127.0.0.1:4433");
        let old = first.cert_sha256.unwrap();
        assert!(
            pinned_session(&mut server, &old).await,
            "the first pin works"
        );
        server.renew();
        let new = advertised.borrow().clone().unwrap().cert_sha256.unwrap();
        assert_ne!(new, old, "a new certificate is advertised");
        assert!(pinned_session(&mut server, &new).await, "the new pin works");
        assert!(
            !pinned_session(&mut server, &old).await,
            "the old certificate is no longer served"
        );
    }

    #[test]
    fn the_own_certificate_is_p256_for_13_days_and_its_hash_is_of_the_der() {
        let now = time::OffsetDateTime::now_utc();
        let cert = own_certificate("127.0.0.1", now).unwrap();
        let der = &cert.chain[0];
        assert_eq!(
            cert.sha256.as_deref(),
            Some(hex::encode(sha2::Sha256::digest(der)).as_str())
        );
        let (_, parsed) = x509_parser::parse_x509_certificate(der).unwrap();
        let validity = parsed.validity();
        let total = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(total, 13 * 24 * 3600);
        assert!(total <= 14 * 24 * 3600, "browsers pin at most 14 days");
        assert_eq!(
            parsed.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.10045.2.1",
            "an EC key"
        );
        // The listener takes it.
        server_config(cert).unwrap();
    }
}
