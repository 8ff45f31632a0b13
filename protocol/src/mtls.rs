//! Mutual-TLS material for the QUIC mesh (edge <-> origin <-> packager) and rustls configs built
//! from it. Every peer presents a certificate signed by the mesh CA and verifies the other side's.

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// ALPN protocol id of the relay link.
pub const RELAY_ALPN: &[u8] = b"amphi-relay/1";

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// A PEM file did not parse.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("tls config: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A node's certificate chain and key, plus the CA that signs its peers.
pub struct MtlsMaterial {
    /// The mesh CA.
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for MtlsMaterial {
    fn clone(&self) -> Self {
        MtlsMaterial {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl MtlsMaterial {
    /// Parse PEM text (CA certificate, certificate chain, private key).
    pub fn from_pem(ca: &str, chain: &str, key: &str) -> Result<Self, MtlsError> {
        let ca = CertificateDer::from_pem_slice(ca.as_bytes())
            .map_err(|e| MtlsError::Pem(format!("ca: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MtlsError::Pem(format!("cert: {e}")))?;
        if chain.is_empty() {
            return Err(MtlsError::Pem("cert: no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| MtlsError::Pem(format!("key: {e}")))?;
        Ok(MtlsMaterial { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, MtlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// TLS 1.3 server config that requires a client certificate from the mesh CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, MtlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, ring())
                .build()
                .map_err(|e| MtlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        Ok(cfg)
    }

    /// TLS 1.3 client config that presents this node's certificate and trusts only the mesh CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, MtlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        Ok(cfg)
    }
}

/// A throwaway CA for `amphi dev` and tests, able to issue node certificates.
pub struct DevPki {
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// PEM text of an issued node certificate (to write to files).
pub struct IssuedPem {
    /// CA certificate.
    pub ca: String,
    /// Node certificate.
    pub cert: String,
    /// Node private key (PKCS#8).
    pub key: String,
}

impl DevPki {
    /// Generate a new CA.
    pub fn generate() -> Result<Self, MtlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "amphi dev mesh CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_cert = params.self_signed(&ca_key)?;
        Ok(DevPki { ca_cert, ca_key })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// Issue a certificate for `name` valid as both TLS server and client.
    pub fn issue_pem(&self, name: &str) -> Result<IssuedPem, MtlsError> {
        self.issue_pem_for(&[name.to_string()])
    }

    /// Issue a certificate for several `names` (DNS names, or IP addresses, which become IP
    /// address SANs), valid as both TLS server and client; the first is the common name.
    pub fn issue_pem_for(&self, names: &[String]) -> Result<IssuedPem, MtlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        if let Some(cn) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn.as_str());
        }
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok(IssuedPem {
            ca: self.ca_pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Issue a certificate for `name` as ready-to-use material.
    pub fn issue(&self, name: &str) -> Result<MtlsMaterial, MtlsError> {
        let pem = self.issue_pem(name)?;
        MtlsMaterial::from_pem(&pem.ca, &pem.cert, &pem.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_for_several_names_carry_ip_address_sans() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        let pki = DevPki::generate().unwrap();
        let pem = pki
            .issue_pem_for(&["10.77.1.6".into(), "origin.amphi.internal".into()])
            .unwrap();
        let m = MtlsMaterial::from_pem(&pem.ca, &pem.cert, &pem.key).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            m.roots().unwrap(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let valid_for = |name: &str| {
            let name = ServerName::try_from(name.to_string()).unwrap();
            verifier
                .verify_server_cert(&m.chain[0], &[], &name, &[], UnixTime::now())
                .is_ok()
        };
        assert!(valid_for("10.77.1.6"));
        assert!(valid_for("origin.amphi.internal"));
        assert!(!valid_for("10.77.1.7"));
    }

    #[test]
    fn dev_pki_material_builds_both_configs() {
        let pki = DevPki::generate().unwrap();
        let m = pki.issue("origin.amphi.internal").unwrap();
        assert_eq!(
            m.server_config().unwrap().alpn_protocols,
            vec![RELAY_ALPN.to_vec()]
        );
        assert!(m.client_config().is_ok());
        assert!(MtlsMaterial::from_pem("nope", "nope", "nope").is_err());
    }
}
