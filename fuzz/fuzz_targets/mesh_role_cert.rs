//! Mesh peers' certificates (the origin reads a connecting peer's roles from its `amphi-role:`
//! URI SANs; edges, packagers and routers check the origin's). A certificate with generated
//! subject alternative names (role URIs with near-miss prefixes and names, duplicates, DNS names,
//! addresses, e-mail names) gives exactly its known roles, once each, in order; the same DER with
//! bytes flipped or cut off is refused or read without panicking.
#![no_main]
use amphi_common::mtls::{roles_of, MeshRole, ROLE_URI_PREFIX};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, Ia5String, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use std::sync::OnceLock;

const PREFIXES: [&str; 6] = [
    ROLE_URI_PREFIX,
    "AMPHI-ROLE:",
    "amphi-role",
    "",
    "amphi-role::",
    "spiffe://amphi/",
];
const NAMES: [&str; 8] = [
    "edge",
    "origin",
    "packager",
    "router",
    "Origin",
    "edge ",
    "",
    "origin/edge",
];

/// One subject alternative name.
#[derive(Arbitrary, Debug)]
enum San {
    Uri { prefix: u8, name: u8 },
    Dns(u8),
    Ip([u8; 4]),
    Email(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    sans: Vec<San>,
    /// Byte flips (offset, xor) applied to the DER.
    flips: Vec<(u16, u8)>,
    /// Bytes kept of the DER (all when zero or larger).
    keep: u16,
}

fuzz_target!(|input: Input| {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    let key = KEY.get_or_init(|| KeyPair::generate().expect("key"));
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut want: Vec<MeshRole> = Vec::new();
    for san in input.sans.iter().take(16) {
        let entry = match san {
            San::Uri { prefix, name } => {
                let prefix = PREFIXES[usize::from(*prefix) % PREFIXES.len()];
                let name = NAMES[usize::from(*name) % NAMES.len()];
                let uri = format!("{prefix}{name}");
                if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX).and_then(MeshRole::parse) {
                    if !want.contains(&role) {
                        want.push(role);
                    }
                }
                SanType::URI(Ia5String::try_from(uri).expect("ASCII"))
            }
            San::Dns(n) => SanType::DnsName(
                Ia5String::try_from(format!("{}.amphi.internal", NAMES[usize::from(*n) % 4]))
                    .expect("ASCII"),
            ),
            San::Ip(ip) => SanType::IpAddress(std::net::IpAddr::from(*ip)),
            San::Email(n) => SanType::Rfc822Name(
                Ia5String::try_from(format!("amphi-role:{}@x", NAMES[usize::from(*n) % 4]))
                    .expect("ASCII"),
            ),
        };
        params.subject_alt_names.push(entry);
    }
    let cert = params.self_signed(key).expect("self-signed");
    assert_eq!(roles_of(cert.der()).expect("own certificate parses"), want);

    let mut der = cert.der().to_vec();
    for (at, xor) in input.flips.iter().take(8) {
        let i = usize::from(*at) % der.len();
        der[i] ^= xor;
    }
    if input.keep > 0 {
        der.truncate(usize::from(input.keep));
    }
    if let Ok(roles) = roles_of(&CertificateDer::from(der)) {
        assert!(roles.len() <= MeshRole::ALL.len());
    }
});
