//! DTLS 1.2 for str0m on OpenSSL, so peers with **RSA** certificates can connect.
//!
//! str0m 0.25's own DTLS stack (dimpl) accepts only ECDSA peer certificates: GStreamer's
//! `webrtcbin` (an RSA-2048 certificate), older libwebrtc builds and some hardware encoders fail
//! its handshake with alert 40. [`crypto_provider`] is str0m's aws-lc-rs provider (SRTP, hashes,
//! STUN HMAC) with the DTLS part replaced by this module: OpenSSL's DTLS state machine (the
//! `openssl` crate over the system libssl) driven sans-IO through an in-memory datagram stream.
//! Our own certificate stays the ECDSA P-256 one str0m's provider makes; the peer may use ECDSA
//! or RSA. OpenSSL checks nothing about the peer's certificate beyond its signature in the
//! handshake: str0m compares its fingerprint with the SDP's `a=fingerprint` ([`DtlsOutput::PeerCert`]).
//!
//! When a handshake fails the instance keeps OpenSSL's reason (e.g. `sslv3 alert bad
//! certificate`); the media driver reads it with [`take_handshake_failure`] right after str0m
//! reports the error, on the same thread, and logs it with the peer it belongs to.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use openssl::pkey::PKey;
use openssl::ssl::{
    ErrorCode, HandshakeError, MidHandshakeSslStream, ShutdownState, Ssl, SslContext, SslMethod,
    SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, KeyingMaterial,
    ProtocolVersion, SrtpProfile,
};
use str0m::crypto::{CryptoError, CryptoProvider};

/// str0m's default provider (aws-lc-rs) with DTLS on OpenSSL: accepts RSA and ECDSA peers.
pub fn crypto_provider() -> CryptoProvider {
    static DTLS: OpensslDtls = OpensslDtls;
    let mut provider = str0m::crypto::from_feature_flags();
    // Certificates still come from the default provider (ECDSA P-256, as browsers expect).
    let certs: &'static dyn DtlsProvider = provider.dtls_provider;
    let _ = DEFAULT_CERTS.set(certs);
    provider.dtls_provider = &DTLS;
    provider
}

/// The reason of the last DTLS handshake that failed on this thread, if not taken yet.
pub fn take_handshake_failure() -> Option<String> {
    LAST_FAILURE.with(|f| f.borrow_mut().take())
}

/// SRTP keying material a DTLS session on this thread handed to str0m, if not taken yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedKeying {
    /// The RFC 5764 keying material: client key, server key, client salt, server salt.
    pub material: Vec<u8>,
    /// The negotiated SRTP protection profile.
    pub profile: SrtpProfile,
    /// Whether this side is the DTLS client (it sends with the client's key and salt).
    pub active: bool,
}

/// The SRTP keying material the last DTLS session on this thread exported to str0m, if not
/// taken yet: str0m keeps its SRTP keys to itself, the media core's forwarding fast path
/// ([`crate::srtp_out`]) takes them here, right after driving the peer whose session it is.
pub fn take_exported_keying() -> Option<ExportedKeying> {
    EXPORTED.with(|k| k.borrow_mut().take())
}

thread_local! {
    static LAST_FAILURE: RefCell<Option<String>> = const { RefCell::new(None) };
    static EXPORTED: RefCell<Option<ExportedKeying>> = const { RefCell::new(None) };
}

/// The provider that makes our certificates (the one [`crypto_provider`] started from).
static DEFAULT_CERTS: std::sync::OnceLock<&'static dyn DtlsProvider> = std::sync::OnceLock::new();

/// RFC 5764 §4.2 exporter label for the SRTP keys.
const SRTP_EXPORTER_LABEL: &str = "EXTRACTOR-dtls_srtp";
/// Cipher suites with forward secrecy and AEAD; OpenSSL picks those that fit the certificates.
const CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-RSA-CHACHA20-POLY1305";
/// SRTP protection profiles offered/accepted, most preferred first.
const SRTP_PROFILES: &str = "SRTP_AEAD_AES_128_GCM:SRTP_AEAD_AES_256_GCM:SRTP_AES128_CM_SHA1_80";
/// How often a handshake in progress is stepped so OpenSSL can retransmit a lost flight (its own
/// timer starts at 1 s and doubles; stepping earlier than it is due does nothing).
const HANDSHAKE_TICK: Duration = Duration::from_millis(100);
/// Most datagrams queued in either direction; a peer that floods a handshake is cut off.
const QUEUE_LIMIT: usize = 64;
/// Largest DTLS datagram read (bigger ones are truncated, which OpenSSL rejects).
const MAX_DATAGRAM: usize = 2048;
/// MTU when str0m gives none.
const DEFAULT_MTU: usize = 1150;

/// The [`DtlsProvider`] of [`crypto_provider`].
#[derive(Debug)]
struct OpensslDtls;

impl DtlsProvider for OpensslDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        DEFAULT_CERTS.get()?.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        if dtls_version == DtlsVersion::Dtls13 {
            return Err(CryptoError::Other(
                "the OpenSSL DTLS provider speaks DTLS 1.2 only".into(),
            ));
        }
        let ssl = new_ssl(cert, mtu.unwrap_or(DEFAULT_MTU))
            .map_err(|e| CryptoError::Other(format!("OpenSSL DTLS setup: {e}")))?;
        Ok(Box::new(OpensslInstance {
            state: State::Init(ssl, Datagrams::default()),
            active: None,
            now,
            next_tick: None,
            connected_emitted: false,
            peer_cert: None,
            keying: None,
            app_in: VecDeque::new(),
            app_out: VecDeque::new(),
            failed: false,
            close_notify: CloseState::Open,
        }))
    }
}

fn new_ssl(cert: &DtlsCert, mtu: usize) -> Result<Ssl, openssl::error::ErrorStack> {
    let mut ctx = SslContext::builder(SslMethod::dtls())?;
    ctx.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    ctx.set_cipher_list(CIPHERS)?;
    ctx.set_tlsext_use_srtp(SRTP_PROFILES)?;
    // Ask for the peer's certificate and require one; its fingerprint is str0m's to check.
    ctx.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        |_, _| true,
    );
    let x509 = X509::from_der(&cert.certificate)?;
    let key = PKey::private_key_from_der(&cert.private_key)?;
    ctx.set_certificate(&x509)?;
    ctx.set_private_key(&key)?;
    ctx.check_private_key()?;
    ctx.set_options(SslOptions::SINGLE_ECDH_USE | SslOptions::NO_QUERY_MTU);
    let ctx = ctx.build();
    let mut ssl = Ssl::new(&ctx)?;
    ssl.set_mtu(mtu as u32)?;
    Ok(ssl)
}

/// The in-memory datagram "socket" OpenSSL reads and writes: one read is one received datagram,
/// one write one datagram to send.
#[derive(Default)]
struct Datagrams {
    incoming: VecDeque<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
}

impl io::Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(d) = self.incoming.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok(n)
    }
}

impl io::Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.outgoing.len() >= QUEUE_LIMIT {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum State {
    /// Before the first handshake step (the role is not known yet).
    Init(Ssl, Datagrams),
    Handshaking(MidHandshakeSslStream<Datagrams>),
    Established(SslStream<Datagrams>),
    /// The handshake failed: only the alert left to send.
    Failed(Datagrams),
    /// Transitional while a step owns the state.
    Taken,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum CloseState {
    Open,
    /// We sent (or answered) close_notify.
    Sent,
    /// The peer's close_notify still has to be reported to str0m.
    ReceivedUnreported,
    Reported,
}

/// One DTLS association.
struct OpensslInstance {
    state: State,
    active: Option<bool>,
    now: Instant,
    next_tick: Option<Instant>,
    connected_emitted: bool,
    peer_cert: Option<Vec<u8>>,
    keying: Option<(Vec<u8>, SrtpProfile)>,
    app_in: VecDeque<Vec<u8>>,
    app_out: VecDeque<Vec<u8>>,
    failed: bool,
    close_notify: CloseState,
}

fn failure() -> DtlsImplError {
    DtlsImplError::CryptoError(dimpl::CryptoError::OperationFailed(
        dimpl::CryptoOperation::Decrypt,
    ))
}

impl OpensslInstance {
    fn datagrams(&mut self) -> Option<&mut Datagrams> {
        match &mut self.state {
            State::Init(_, d) => Some(d),
            State::Handshaking(m) => Some(m.get_mut()),
            State::Established(s) => Some(s.get_mut()),
            State::Failed(d) => Some(d),
            State::Taken => None,
        }
    }

    /// Run the handshake as far as the datagrams received allow.
    fn step_handshake(&mut self) -> Result<(), DtlsImplError> {
        let Some(active) = self.active else {
            return Ok(());
        };
        let result = match std::mem::replace(&mut self.state, State::Taken) {
            State::Init(ssl, d) => {
                if active {
                    ssl.connect(d)
                } else {
                    ssl.accept(d)
                }
            }
            State::Handshaking(mid) => mid.handshake(),
            other => {
                self.state = other;
                return Ok(());
            }
        };
        match result {
            Ok(stream) => {
                self.on_established(&stream);
                self.state = State::Established(stream);
                self.next_tick = None;
                Ok(())
            }
            Err(HandshakeError::WouldBlock(mid)) => {
                self.state = State::Handshaking(mid);
                self.next_tick = Some(self.now + HANDSHAKE_TICK);
                Ok(())
            }
            Err(HandshakeError::Failure(mid)) => {
                let reason = mid
                    .error()
                    .ssl_error()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| mid.error().to_string());
                // Keep the alert OpenSSL queued for the peer.
                let mut mid = mid;
                let outgoing = std::mem::take(&mut mid.get_mut().outgoing);
                self.fail(
                    Datagrams {
                        incoming: VecDeque::new(),
                        outgoing,
                    },
                    reason,
                )
            }
            Err(HandshakeError::SetupFailure(e)) => self.fail(Datagrams::default(), e.to_string()),
        }
    }

    fn fail(&mut self, rest: Datagrams, reason: String) -> Result<(), DtlsImplError> {
        tracing::debug!(%reason, "DTLS handshake failed");
        LAST_FAILURE.with(|f| *f.borrow_mut() = Some(reason));
        self.failed = true;
        self.next_tick = None;
        self.state = State::Failed(rest);
        Err(failure())
    }

    fn on_established(&mut self, stream: &SslStream<Datagrams>) {
        let ssl = stream.ssl();
        self.peer_cert = ssl.peer_certificate().and_then(|c| c.to_der().ok());
        let profile = ssl.selected_srtp_profile().and_then(|p| match p.name() {
            "SRTP_AES128_CM_SHA1_80" => Some(SrtpProfile::AES128_CM_SHA1_80),
            "SRTP_AEAD_AES_128_GCM" => Some(SrtpProfile::AEAD_AES_128_GCM),
            "SRTP_AEAD_AES_256_GCM" => Some(SrtpProfile::AEAD_AES_256_GCM),
            _ => None,
        });
        if let Some(profile) = profile {
            let mut km = vec![0u8; profile.keying_material_len()];
            if ssl
                .export_keying_material(&mut km, SRTP_EXPORTER_LABEL, None)
                .is_ok()
            {
                self.keying = Some((km, profile));
            }
        }
    }

    /// Read whatever application data (or close_notify) the received datagrams hold.
    fn read_established(&mut self) -> Result<(), DtlsImplError> {
        let State::Established(stream) = &mut self.state else {
            return Ok(());
        };
        let mut buf = [0u8; MAX_DATAGRAM];
        // Every read consumes a datagram: at most one more round than there are queued.
        for _ in 0..=QUEUE_LIMIT {
            match stream.ssl_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if self.app_in.len() >= QUEUE_LIMIT {
                        return Err(DtlsImplError::ReceiveQueueFull);
                    }
                    self.app_in.push_back(buf[..n].to_vec());
                }
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => break,
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                    break
                }
                // A bad record after the handshake is dropped, as DTLS allows (RFC 6347 §4.1.2.7).
                Err(_) if !stream.get_ref().incoming.is_empty() => {}
                Err(_) => break,
            }
        }
        if stream.get_shutdown().contains(ShutdownState::RECEIVED)
            && self.close_notify == CloseState::Open
        {
            let _ = stream.shutdown();
            self.close_notify = CloseState::ReceivedUnreported;
        }
        Ok(())
    }

    fn flush_app_out(&mut self) -> Result<(), DtlsImplError> {
        let State::Established(stream) = &mut self.state else {
            return Ok(());
        };
        while let Some(data) = self.app_out.front() {
            match stream.ssl_write(data) {
                Ok(_) => {
                    self.app_out.pop_front();
                }
                Err(e) if e.code() == ErrorCode::WANT_WRITE => break,
                Err(_) => return Err(DtlsImplError::TransmitQueueFull),
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for OpensslInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpensslInstance")
            .field("active", &self.active)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl DtlsInstance for OpensslInstance {
    fn set_active(&mut self, active: bool) {
        self.active = Some(active);
        if active {
            // The client speaks first: its ClientHello goes out on the first poll.
            self.next_tick = Some(self.now);
        }
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        if self.failed {
            return Err(failure());
        }
        let Some(d) = self.datagrams() else {
            return Err(failure());
        };
        if d.incoming.len() >= QUEUE_LIMIT {
            return Err(DtlsImplError::ReceiveQueueFull);
        }
        if !packet.is_empty() {
            d.incoming.push_back(packet.to_vec());
        }
        match self.state {
            State::Established(_) => self.read_established(),
            _ => self.step_handshake(),
        }
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        if let Some(d) = self.datagrams() {
            if let Some(p) = d.outgoing.front() {
                if p.len() > buf.len() {
                    return DtlsOutput::BufferTooSmall { needed: p.len() };
                }
                let p = d.outgoing.pop_front().expect("front exists");
                buf[..p.len()].copy_from_slice(&p);
                return DtlsOutput::Packet(&buf[..p.len()]);
            }
        }
        if matches!(self.state, State::Established(_)) {
            if let Some(der) = self.peer_cert.take() {
                if der.len() > buf.len() {
                    let needed = der.len();
                    self.peer_cert = Some(der);
                    return DtlsOutput::BufferTooSmall { needed };
                }
                buf[..der.len()].copy_from_slice(&der);
                return DtlsOutput::PeerCert(&buf[..der.len()]);
            }
            if let Some((km, profile)) = self.keying.take() {
                let active = self.active.unwrap_or(false);
                EXPORTED.with(|k| {
                    *k.borrow_mut() = Some(ExportedKeying {
                        material: km.clone(),
                        profile,
                        active,
                    })
                });
                return DtlsOutput::KeyingMaterial(KeyingMaterial::new(&km), profile);
            }
            if !self.connected_emitted {
                self.connected_emitted = true;
                return DtlsOutput::Connected;
            }
            if self.close_notify == CloseState::ReceivedUnreported {
                self.close_notify = CloseState::Reported;
                return DtlsOutput::CloseNotify;
            }
            if let Some(data) = self.app_in.front() {
                if data.len() > buf.len() {
                    return DtlsOutput::BufferTooSmall { needed: data.len() };
                }
                let data = self.app_in.pop_front().expect("front exists");
                buf[..data.len()].copy_from_slice(&data);
                return DtlsOutput::ApplicationData(&buf[..data.len()]);
            }
        }
        DtlsOutput::Timeout(
            self.next_tick
                .unwrap_or_else(|| self.now + Duration::from_secs(3600)),
        )
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.now = now;
        if self.failed {
            return Ok(());
        }
        match self.next_tick {
            Some(t) if t <= now => {
                self.next_tick = None;
                match self.state {
                    State::Init(..) | State::Handshaking(_) => self.step_handshake(),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        if self.failed || self.close_notify != CloseState::Open {
            return Err(DtlsImplError::ConnectionClosed);
        }
        if !matches!(self.state, State::Established(_)) || data.is_empty() {
            return Ok(0);
        }
        if self.app_out.len() >= QUEUE_LIMIT {
            return Ok(0);
        }
        self.app_out.push_back(data.to_vec());
        self.flush_app_out()?;
        Ok(data.len())
    }

    fn is_active(&self) -> bool {
        self.active.unwrap_or(false)
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        matches!(self.state, State::Established(_)).then_some(ProtocolVersion::DTLS1_2)
    }

    fn is_closing(&self) -> bool {
        self.close_notify != CloseState::Open
    }

    fn is_closed(&self) -> bool {
        self.close_notify != CloseState::Open
            && match &self.state {
                State::Established(s) => s.get_ref().outgoing.is_empty(),
                _ => true,
            }
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        if let State::Established(stream) = &mut self.state {
            if self.close_notify == CloseState::Open {
                let _ = stream.shutdown();
            }
        }
        if self.close_notify == CloseState::Open {
            self.close_notify = CloseState::Sent;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::rsa::Rsa;

    /// An RSA-2048 self-signed certificate, as GStreamer 1.22's webrtcbin makes.
    fn rsa_cert() -> DtlsCert {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "gst").unwrap();
        let name = name.build();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        DtlsCert {
            certificate: b.build().to_der().unwrap(),
            private_key: key.private_key_to_der().unwrap(),
        }
    }

    /// What one side reported while being driven.
    #[derive(Default)]
    struct Seen {
        connected: bool,
        peer_cert: Option<Vec<u8>>,
        keying: Option<(Vec<u8>, SrtpProfile)>,
        data: Vec<Vec<u8>>,
    }

    /// Drain `from`, deliver its packets to `to`; returns the first error `to` reports.
    fn pump(
        from: &mut dyn DtlsInstance,
        seen: &mut Seen,
        to: &mut dyn DtlsInstance,
        now: Instant,
    ) -> Result<(), DtlsImplError> {
        from.handle_timeout(now).ok();
        let mut buf = vec![0u8; 4096];
        let mut packets = Vec::new();
        for _ in 0..100 {
            match from.poll_output(&mut buf) {
                DtlsOutput::Packet(p) => packets.push(p.to_vec()),
                DtlsOutput::Connected => seen.connected = true,
                DtlsOutput::PeerCert(c) => seen.peer_cert = Some(c.to_vec()),
                DtlsOutput::KeyingMaterial(k, p) => seen.keying = Some((k.to_vec(), p)),
                DtlsOutput::ApplicationData(d) => seen.data.push(d.to_vec()),
                DtlsOutput::Timeout(_) => break,
                _ => {}
            }
        }
        for p in packets {
            to.handle_packet(&p)?;
        }
        Ok(())
    }

    /// Run a handshake between `client` and `server` (simulated time, 30 flights at most).
    fn handshake(
        client: &mut dyn DtlsInstance,
        server: &mut dyn DtlsInstance,
    ) -> (Seen, Seen, Result<(), DtlsImplError>) {
        let (mut c, mut s) = (Seen::default(), Seen::default());
        client.set_active(true);
        server.set_active(false);
        let mut now = Instant::now();
        // dimpl wants a first timeout before any packet.
        client.handle_timeout(now).ok();
        server.handle_timeout(now).ok();
        for _ in 0..30 {
            now += Duration::from_millis(10);
            if let Err(e) = pump(client, &mut c, server, now) {
                return (c, s, Err(e));
            }
            if let Err(e) = pump(server, &mut s, client, now) {
                return (c, s, Err(e));
            }
            if c.connected && s.connected {
                break;
            }
        }
        (c, s, Ok(()))
    }

    fn edge_cert() -> DtlsCert {
        crypto_provider()
            .dtls_provider
            .generate_certificate()
            .expect("ECDSA certificate")
    }

    #[test]
    fn rsa_client_connects_and_both_sides_derive_the_same_srtp_keys() {
        let server_cert = edge_cert();
        let client_cert = rsa_cert();
        let now = Instant::now();
        let mut server = OpensslDtls
            .new_dtls(&server_cert, now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let mut client = OpensslDtls
            .new_dtls(&client_cert, now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let (c, s, r) = handshake(client.as_mut(), server.as_mut());
        r.expect("handshake succeeds");
        assert!(c.connected && s.connected);
        assert_eq!(s.peer_cert.as_deref(), Some(&client_cert.certificate[..]));
        assert_eq!(c.peer_cert.as_deref(), Some(&server_cert.certificate[..]));
        let (ck, cp) = c.keying.expect("client keys");
        let (sk, sp) = s.keying.expect("server keys");
        assert_eq!(cp, sp);
        assert_eq!(ck, sk);
        assert_eq!(ck.len(), cp.keying_material_len());
        // The last session to finish on this thread left its keys for the fast path, once.
        let exported = take_exported_keying().expect("keys exported on this thread");
        assert_eq!((exported.material, exported.profile), (sk, sp));
        assert!(take_exported_keying().is_none());
        assert_eq!(server.protocol_version(), Some(ProtocolVersion::DTLS1_2));

        // Application data (SCTP for data channels) flows both ways.
        assert_eq!(client.send_application_data(b"hello").unwrap(), 5);
        let mut s2 = Seen::default();
        let mut c2 = Seen::default();
        pump(client.as_mut(), &mut c2, server.as_mut(), now).unwrap();
        pump(server.as_mut(), &mut s2, client.as_mut(), now).unwrap();
        assert_eq!(s2.data, vec![b"hello".to_vec()]);
    }

    #[test]
    fn str0m_dimpl_client_still_connects() {
        let now = Instant::now();
        let dimpl = str0m::crypto::from_feature_flags().dtls_provider;
        let client_cert = dimpl.generate_certificate().unwrap();
        let mut client = dimpl
            .new_dtls(&client_cert, now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let mut server = OpensslDtls
            .new_dtls(&edge_cert(), now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let (c, s, r) = handshake(client.as_mut(), server.as_mut());
        r.expect("handshake succeeds");
        assert!(c.connected && s.connected);
        assert_eq!(c.keying.unwrap().0, s.keying.unwrap().0);
    }

    /// Why this module exists: str0m's default DTLS (dimpl) refuses the RSA client.
    #[test]
    fn str0m_default_dtls_refuses_an_rsa_client() {
        let now = Instant::now();
        let dimpl = str0m::crypto::from_feature_flags().dtls_provider;
        let mut server = dimpl
            .new_dtls(&edge_cert(), now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let mut client = OpensslDtls
            .new_dtls(&rsa_cert(), now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let (c, s, r) = handshake(client.as_mut(), server.as_mut());
        assert!(r.is_err() || !s.connected, "dimpl must refuse it");
        assert!(!c.connected || !s.connected);
        let _ = take_handshake_failure();
    }

    #[test]
    fn a_failed_handshake_leaves_its_reason_for_the_log() {
        let now = Instant::now();
        let _ = take_handshake_failure();
        // A DTLS 1.3-only client: nothing in common with this DTLS 1.2 server.
        let dimpl = str0m::crypto::from_feature_flags().dtls_provider;
        let mut client = dimpl
            .new_dtls(&edge_cert(), now, DtlsVersion::Dtls13, Some(1150))
            .unwrap();
        let mut server = OpensslDtls
            .new_dtls(&edge_cert(), now, DtlsVersion::Dtls12, Some(1150))
            .unwrap();
        let (_, s, r) = handshake(client.as_mut(), server.as_mut());
        assert!(r.is_err(), "the handshake must fail");
        assert!(!s.connected);
        let reason = take_handshake_failure().expect("a reason");
        assert!(reason.contains("SSL routines"), "{reason}");
        // Taken once.
        assert!(take_handshake_failure().is_none());
        // The dead instance refuses more input rather than starting over.
        assert!(server.handle_packet(&[22, 254, 253, 0]).is_err());
    }
}
