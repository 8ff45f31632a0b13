//! The HTTPS listener: rustls (ring) with ALPN `h2` and `http/1.1`, hyper's auto connection
//! builder, the same axum router as the plain listener. Apple requires HTTP/2 for LL-HLS.

use crate::{PackagerError, PackagerOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Build the acceptor from the configured PEM files, or a self-signed certificate for
/// `localhost` / `127.0.0.1` written to `{data_dir}/tls/packager.crt` (dev).
pub async fn acceptor(
    options: &PackagerOptions,
    data_dir: &Path,
) -> Result<TlsAcceptor, PackagerError> {
    let bad = |e: &dyn std::fmt::Display| PackagerError::HttpsTls(e.to_string());
    let (certs, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) =
        match (&options.tls_cert, &options.tls_key) {
            (Some(c), Some(k)) => {
                let certs = CertificateDer::pem_file_iter(c)
                    .map_err(|e| bad(&e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&e))?;
                let key = PrivateKeyDer::from_pem_file(k).map_err(|e| bad(&e))?;
                (certs, key)
            }
            (None, None) => {
                let ck = rcgen::generate_simple_self_signed(vec![
                    "localhost".to_string(),
                    "127.0.0.1".to_string(),
                ])
                .map_err(|e| bad(&e))?;
                let dir = data_dir.join("tls");
                tokio::fs::create_dir_all(&dir).await?;
                tokio::fs::write(dir.join("packager.crt"), ck.cert.pem()).await?;
                let key = PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
                (vec![ck.cert.der().clone()], key)
            }
            _ => {
                return Err(PackagerError::HttpsTls(
                    "tls_cert and tls_key go together".into(),
                ))
            }
        };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Accept TLS connections until shutdown; each is served HTTP/2 or HTTP/1.1 by ALPN.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    app: axum::Router,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "https accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let sd = shutdown.clone();
        tracker.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            crate::http::serve_connection(tls, app, peer, &sd).await;
        });
    }
    tracker.close();
    tracker.wait().await;
}
