//! The HTTPS listener's TLS material: the configured PEM files, or a self-signed certificate
//! for `localhost` / `127.0.0.1` in dev. Serving (rustls with ALPN `h2` and `http/1.1`, the same
//! axum router as the plain listener) is `amphi_protocol::https::serve_tls`. Apple requires
//! HTTP/2 for LL-HLS.

use crate::{PackagerError, PackagerOptions};
use amphi_protocol::https;
use rustls_pki_types::PrivateKeyDer;
use std::path::Path;
use tokio_rustls::TlsAcceptor;

/// Build the acceptor from the configured PEM files, or a self-signed certificate for
/// `localhost` / `127.0.0.1` written to `{data_dir}/tls/packager.crt` (dev).
pub async fn acceptor(
    options: &PackagerOptions,
    data_dir: &Path,
) -> Result<TlsAcceptor, PackagerError> {
    let bad = |e: &dyn std::fmt::Display| PackagerError::HttpsTls(e.to_string());
    match (&options.tls_cert, &options.tls_key) {
        (Some(c), Some(k)) => https::acceptor(c, k).map_err(|e| bad(&e)),
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
            https::acceptor_from(vec![ck.cert.der().clone()], key).map_err(|e| bad(&e))
        }
        _ => Err(PackagerError::HttpsTls(
            "tls_cert and tls_key go together".into(),
        )),
    }
}
