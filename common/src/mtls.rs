//! Mutual-TLS material for the QUIC mesh (edge <-> origin <-> packager) and rustls configs built
//! from it. Every peer presents a certificate signed by the mesh CA and verifies the other side's.
//!
//! A mesh certificate also says what its holder may act as: one URI subject alternative name
//! `amphi-role:<role>` per [`MeshRole`] (`amphi-role:edge`, `amphi-role:origin`, ...). The origin
//! accepts a peer's `Hello` only for a role its certificate carries, and mesh clients accept only
//! an origin certificate ([`MtlsMaterial::client_config`]). With openssl:
//! `-addext "subjectAltName=DNS:edge-1.amphi.internal,URI:amphi-role:edge"`.

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
    /// A certificate did not parse as X.509.
    #[error("bad certificate: {0}")]
    Certificate(String),
}

/// Prefix of the URI subject alternative names that carry a mesh role.
pub const ROLE_URI_PREFIX: &str = "amphi-role:";

/// What a mesh certificate allows its holder to act as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MeshRole {
    /// An origin (accepts the mesh's QUIC connections).
    Origin,
    /// An edge node (publishes speakers, acts for participants).
    Edge,
    /// A cdn-packager (receives program streams).
    Packager,
    /// A geo-router (ends rooms).
    Router,
}

impl MeshRole {
    /// Every role.
    pub const ALL: [MeshRole; 4] = [
        MeshRole::Origin,
        MeshRole::Edge,
        MeshRole::Packager,
        MeshRole::Router,
    ];

    /// The role's name (`edge`, `origin`, `packager`, `router`).
    pub fn as_str(self) -> &'static str {
        match self {
            MeshRole::Origin => "origin",
            MeshRole::Edge => "edge",
            MeshRole::Packager => "packager",
            MeshRole::Router => "router",
        }
    }

    /// The URI subject alternative name carrying the role (`amphi-role:edge`).
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    /// The role named `name`, if any.
    pub fn parse(name: &str) -> Option<MeshRole> {
        MeshRole::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for MeshRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mesh roles a DER certificate carries (its `amphi-role:` URI SANs; unknown role names are
/// ignored). A certificate that does not parse is an error, one without roles gives none.
pub fn roles_of(cert: &CertificateDer<'_>) -> Result<Vec<MeshRole>, MtlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| MtlsError::Certificate(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| MtlsError::Certificate(e.to_string()))?;
    let mut roles = Vec::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX).and_then(MeshRole::parse) {
                if !roles.contains(&role) {
                    roles.push(role);
                }
            }
        }
    }
    Ok(roles)
}

/// Checks the origin's certificate as rustls' WebPKI verifier does, then requires the
/// `amphi-role:origin` SAN, so no other mesh certificate can stand in for an origin.
#[derive(Debug)]
struct OriginVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for OriginVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match roles_of(end_entity) {
            Ok(roles) if roles.contains(&MeshRole::Origin) => Ok(verified),
            _ => Err(rustls::Error::General(
                "the peer's mesh certificate does not carry amphi-role:origin".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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

    /// The mesh roles this node's own certificate carries.
    pub fn roles(&self) -> Result<Vec<MeshRole>, MtlsError> {
        roles_of(&self.chain[0])
    }

    /// TLS 1.3 client config that presents this node's certificate, trusts only the mesh CA and
    /// accepts only a server certificate carrying `amphi-role:origin` (mesh clients dial origins).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, MtlsError> {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots()?, ring())
                .build()
                .map_err(|e| MtlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(OriginVerifier { inner }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        Ok(cfg)
    }
}

/// A mesh CA able to issue node certificates: throwaway for `amphi dev` and tests, kept on disk
/// by `amphi cert` ([`DevPki::ca_key_pem`], [`DevPki::from_pem`]).
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

/// Common name of the CAs [`DevPki`] makes.
const CA_COMMON_NAME: &str = "amphi dev mesh CA";

impl DevPki {
    /// Generate a new CA.
    pub fn generate() -> Result<Self, MtlsError> {
        Self::with_key(rcgen::KeyPair::generate()?)
    }

    /// The CA certificate over `ca_key` (same subject and key identifier for the same key).
    fn with_key(ca_key: rcgen::KeyPair) -> Result<Self, MtlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, CA_COMMON_NAME);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = params.self_signed(&ca_key)?;
        Ok(DevPki { ca_cert, ca_key })
    }

    /// Load a CA written by `amphi cert ca` (its certificate and key, PEM). Certificates issued
    /// from it chain to `ca_pem`: same subject, same key. A CA made elsewhere (openssl) is
    /// refused; issue with that tool instead.
    pub fn from_pem(ca_pem: &str, ca_key_pem: &str) -> Result<Self, MtlsError> {
        let key = rcgen::KeyPair::from_pem(ca_key_pem)?;
        let pki = Self::with_key(key)?;
        let given = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| MtlsError::Pem(format!("ca: {e}")))?;
        let (_, given) = x509_parser::parse_x509_certificate(given.as_ref())
            .map_err(|e| MtlsError::Certificate(e.to_string()))?;
        let (_, ours) = x509_parser::parse_x509_certificate(pki.ca_cert.der().as_ref())
            .map_err(|e| MtlsError::Certificate(e.to_string()))?;
        if given.subject().as_raw() != ours.subject().as_raw()
            || given.public_key().raw != ours.public_key().raw
        {
            return Err(MtlsError::Certificate(
                "the CA certificate was not made by `amphi cert ca` with this key".into(),
            ));
        }
        Ok(pki)
    }

    /// The CA's private key (PKCS#8 PEM): keep it offline.
    pub fn ca_key_pem(&self) -> String {
        self.ca_key.serialize_pem()
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// Issue a certificate for `name` acting as `role`, valid as both TLS server and client.
    pub fn issue_pem(&self, name: &str, role: MeshRole) -> Result<IssuedPem, MtlsError> {
        self.issue_pem_for(&[name.to_string()], &[role])
    }

    /// Issue a certificate for several `names` (DNS names, or IP addresses, which become IP
    /// address SANs) acting as `roles` (`amphi-role:` URI SANs; none for a certificate used
    /// outside the mesh), valid as both TLS server and client; the first name is the common name.
    pub fn issue_pem_for(
        &self,
        names: &[String],
        roles: &[MeshRole],
    ) -> Result<IssuedPem, MtlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        for role in roles {
            let uri = rcgen::Ia5String::try_from(role.uri())?;
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
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

    /// Issue a certificate for `name` acting as `role`, as ready-to-use material.
    pub fn issue(&self, name: &str, role: MeshRole) -> Result<MtlsMaterial, MtlsError> {
        let pem = self.issue_pem(name, role)?;
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
            .issue_pem_for(
                &["10.77.1.6".into(), "origin.amphi.internal".into()],
                &[MeshRole::Origin],
            )
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
        let m = pki
            .issue("origin.amphi.internal", MeshRole::Origin)
            .unwrap();
        assert_eq!(
            m.server_config().unwrap().alpn_protocols,
            vec![RELAY_ALPN.to_vec()]
        );
        assert!(m.client_config().is_ok());
        assert!(MtlsMaterial::from_pem("nope", "nope", "nope").is_err());
    }

    #[test]
    fn a_ca_saved_and_loaded_again_issues_certificates_that_chain_to_the_saved_one() {
        let pki = DevPki::generate().unwrap();
        let (ca_pem, key_pem) = (pki.ca_pem(), pki.ca_key_pem());
        let again = DevPki::from_pem(&ca_pem, &key_pem).unwrap();
        let issued = again
            .issue_pem("edge-9.amphi.internal", MeshRole::Edge)
            .unwrap();
        // Verified against the CA certificate written the first time.
        let m = MtlsMaterial::from_pem(&ca_pem, &issued.cert, &issued.key).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots().unwrap(), ring())
                .build()
                .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls_pki_types::ServerName::try_from("edge-9.amphi.internal").unwrap();
        verifier
            .verify_server_cert(
                &m.chain[0],
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        assert_eq!(m.roles().unwrap(), vec![MeshRole::Edge]);
        // Another CA's key does not match the certificate.
        let other = DevPki::generate().unwrap();
        assert!(DevPki::from_pem(&ca_pem, &other.ca_key_pem()).is_err());
        assert!(DevPki::from_pem("nope", &key_pem).is_err());
    }

    #[test]
    fn roles_ride_in_uri_sans_and_unknown_ones_are_ignored() {
        let pki = DevPki::generate().unwrap();
        let edge = pki.issue("edge-1.amphi.internal", MeshRole::Edge).unwrap();
        assert_eq!(edge.roles().unwrap(), vec![MeshRole::Edge]);
        let both = pki
            .issue_pem_for(
                &["x.amphi.internal".into()],
                &[MeshRole::Packager, MeshRole::Router, MeshRole::Packager],
            )
            .unwrap();
        let both = MtlsMaterial::from_pem(&both.ca, &both.cert, &both.key).unwrap();
        assert_eq!(
            both.roles().unwrap(),
            vec![MeshRole::Packager, MeshRole::Router]
        );
        let none = pki.issue_pem_for(&["127.0.0.1".into()], &[]).unwrap();
        let none = MtlsMaterial::from_pem(&none.ca, &none.cert, &none.key).unwrap();
        assert!(none.roles().unwrap().is_empty());
        assert!(roles_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
        for r in MeshRole::ALL {
            assert_eq!(MeshRole::parse(r.as_str()), Some(r));
            assert_eq!(r.uri(), format!("amphi-role:{r}"));
        }
        assert_eq!(MeshRole::parse("admin"), None);
    }

    #[test]
    fn mesh_clients_accept_only_a_server_certificate_with_the_origin_role() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        let pki = DevPki::generate().unwrap();
        let client = pki.issue("edge-1.amphi.internal", MeshRole::Edge).unwrap();
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            client.roots().unwrap(),
            ring(),
        )
        .build()
        .unwrap();
        let verifier = OriginVerifier { inner };
        let name = ServerName::try_from("origin.amphi.internal").unwrap();
        let check = |role: MeshRole| {
            let server = pki.issue("origin.amphi.internal", role).unwrap();
            verifier
                .verify_server_cert(&server.chain[0], &[], &name, &[], UnixTime::now())
                .is_ok()
        };
        assert!(check(MeshRole::Origin));
        assert!(
            !check(MeshRole::Packager),
            "a packager cannot pose as the origin"
        );
        assert!(!check(MeshRole::Edge));
        // Another CA's origin certificate is refused as before.
        let other = DevPki::generate().unwrap();
        let stranger = other
            .issue("origin.amphi.internal", MeshRole::Origin)
            .unwrap();
        assert!(verifier
            .verify_server_cert(&stranger.chain[0], &[], &name, &[], UnixTime::now())
            .is_err());
    }
}
