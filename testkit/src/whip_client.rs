//! A real WHIP (RFC 9725) publishing client built on str0m: sends one Opus audio track.
//!
//! Used by end-to-end tests and by `amphi-tools loadgen`. [`WhipPublisher::connect`] POSTs a sendonly
//! Opus offer (with the RFC 6464 audio-level extension), applies the answer, then a background task
//! drives ICE, DTLS and SRTP on a UDP socket bound to 127.0.0.1:0.

use amphi_protocol::https::HttpsClient;
use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, Full, Limited};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, ExtensionValues, MediaKind, Mid, Pt};
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Default bound on ICE+DTLS connection time in [`WhipPublisher::connect`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each HTTP exchange with the WHIP endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body read.
const MAX_ANSWER_LEN: usize = 256 * 1024;

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WHIP URL or `Location` is not a usable `http://` URL.
    #[error("bad URL: {0}")]
    Url(String),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The endpoint answered with an unexpected status.
    #[error("WHIP endpoint answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body (lossy UTF-8).
        body: String,
    },
    /// The 201 answer lacked a `Location` header.
    #[error("answer without a Location header")]
    MissingLocation,
    /// The answer SDP is unusable.
    #[error("bad SDP answer: {0}")]
    Sdp(String),
    /// The WebRTC stack failed.
    #[error("WebRTC: {0}")]
    Rtc(String),
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// ICE+DTLS did not connect in time.
    #[error("ICE/DTLS did not connect within {0:?}")]
    ConnectTimeout(Duration),
    /// The media task has stopped.
    #[error("the media task has stopped")]
    Closed,
}

enum Command {
    Send {
        payload: Vec<u8>,
        rtp_ts: u32,
        audio_level: u8,
        /// Packet index (sequence number = first + index); `None`: the next one.
        index: Option<u64>,
        /// With RED: the RTP timestamp and payload of the packet to carry as redundancy (for an
        /// indexed send; a plain send carries the previous plain send).
        previous: Option<(u32, Vec<u8>)>,
    },
    Close,
}

/// A connected WHIP publisher with one Opus track.
pub struct WhipPublisher {
    resource: http::Uri,
    token: String,
    http: HttpsClient<Full<Bytes>>,
    etag: Option<String>,
    local_addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    remote_loss: Arc<AtomicU32>,
    red: bool,
    task: JoinHandle<Result<(), ClientError>>,
}

/// How often the publisher's str0m reports egress statistics (the loss the edge's RTCP receiver
/// reports carry, as a browser's encoder sees it).
const STATS_INTERVAL: Duration = Duration::from_millis(500);
/// [`WhipPublisher::remote_loss`] before any receiver report (f32 bits of -1.0).
const NO_LOSS_REPORT: u32 = 0xbf80_0000;

pub(crate) fn rtc_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Rtc(e.to_string())
}

/// Check that `url` is an `http://` or `https://` endpoint (`what` names it in errors).
pub(crate) fn http_endpoint(url: &str, what: &str) -> Result<http::Uri, ClientError> {
    let endpoint: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::Url(e.to_string()))?;
    if !matches!(endpoint.scheme_str(), Some("http" | "https")) {
        return Err(ClientError::Url(format!(
            "only http:// and https:// {what} URLs are supported"
        )));
    }
    Ok(endpoint)
}

/// The signaling HTTP client: system roots plus `extra_ca` (PEM) for `https://` endpoints.
pub(crate) fn signaling_client(
    extra_ca: Option<&std::path::Path>,
) -> Result<HttpsClient<Full<Bytes>>, ClientError> {
    amphi_protocol::https::client(extra_ca).map_err(|e| ClientError::Http(e.to_string()))
}

/// First STUN retransmission timeout of the client's ICE checks.
const ICE_INITIAL_RTO: Duration = Duration::from_millis(100);
/// Largest STUN retransmission timeout (also the keepalive period of a connected pair).
pub(crate) const ICE_MAX_RTO: Duration = Duration::from_millis(250);
/// Unanswered retransmissions after which the pair (and the session) fails.
const ICE_MAX_RETRANSMITS: usize = 4;

/// A str0m peer (RTP mode, Opus only, offering RFC 2198 RED if `red`) on a fresh UDP socket
/// bound to the local address that reaches `toward` (loopback for a loopback edge), which is its
/// host candidate; str0m statistics events every `stats` (none if `None`); an ICE check of the
/// connected pair every `check_every` (never more often than every [`ICE_MAX_RTO`]).
pub(crate) async fn client_rtc(
    toward: &http::Uri,
    stats: Option<Duration>,
    red: bool,
    check_every: Duration,
) -> Result<(UdpSocket, SocketAddr, Rtc), ClientError> {
    amphi_edge::install_crypto_provider();
    let ip = local_ip_toward(toward).await?;
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    let local_addr = socket.local_addr()?;
    let mut config = Rtc::builder()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, red)
        .set_stats_interval(stats);
    // Notice a dead edge after about 1.1 s of unanswered STUN checks (str0m's default is ~20 s),
    // so the session ends and the caller can ask the geo-router for another edge
    // (`amphi_edge::rejoin`).
    config.set_initial_stun_rto(ICE_INITIAL_RTO);
    config.set_max_stun_rto(check_every.max(ICE_MAX_RTO));
    config.set_max_stun_retransmits(ICE_MAX_RETRANSMITS);
    let mut rtc = config.build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local_addr, "udp").map_err(rtc_err)?);
    Ok((socket, local_addr, rtc))
}

/// The local address the kernel would use to reach the endpoint's host: 127.0.0.1 for a loopback
/// edge, the host's own address inside a network namespace (one host candidate is all an
/// ICE-lite edge needs).
async fn local_ip_toward(endpoint: &http::Uri) -> Result<IpAddr, ClientError> {
    let host = endpoint
        .host()
        .ok_or_else(|| ClientError::Http(format!("{endpoint}: no host")))?;
    let port = endpoint.port_u16().unwrap_or(80);
    let target = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await?
        .next()
        .ok_or_else(|| ClientError::Http(format!("{host}: no address")))?;
    let probe = UdpSocket::bind(SocketAddr::new(
        if target.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))
    .await?;
    probe.connect(target).await?;
    Ok(probe.local_addr()?.ip())
}

/// POST an SDP offer with the bearer token; on `201 Created` return the session resource (from
/// `Location`), the response headers and the answer body. Any other status is an error carrying
/// the status and body.
pub(crate) async fn post_offer(
    http: &HttpsClient<Full<Bytes>>,
    endpoint: &http::Uri,
    token: &str,
    offer_sdp: String,
) -> Result<(http::Uri, http::HeaderMap, Bytes), ClientError> {
    let req = http::Request::post(endpoint.clone())
        .header(header::CONTENT_TYPE, "application/sdp")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(offer_sdp)))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let (status, headers, body) = exchange(http, req).await?;
    if status != http::StatusCode::CREATED {
        return Err(ClientError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let location = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ClientError::MissingLocation)?;
    let resource = resolve_location(endpoint, location)?;
    Ok((resource, headers, body))
}

/// Parse an SDP answer body.
pub(crate) fn parse_answer(body: &[u8]) -> Result<SdpAnswer, ClientError> {
    let text =
        std::str::from_utf8(body).map_err(|_| ClientError::Sdp("answer is not UTF-8".into()))?;
    SdpAnswer::from_sdp_string(text).map_err(|e| ClientError::Sdp(e.to_string()))
}

/// Resolve a `Location` value (absolute URL or absolute path) against the endpoint URL.
pub(crate) fn resolve_location(
    endpoint: &http::Uri,
    location: &str,
) -> Result<http::Uri, ClientError> {
    if location.starts_with('/') {
        let scheme = endpoint.scheme_str().unwrap_or("http");
        let authority = endpoint
            .authority()
            .ok_or_else(|| ClientError::Url("endpoint without host".into()))?;
        format!("{scheme}://{authority}{location}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Url(e.to_string()))
    } else {
        location
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Url(e.to_string()))
    }
}

impl WhipPublisher {
    /// POST a sendonly Opus offer to `whip_url` with `Authorization: Bearer token`; on 201 apply
    /// the answer and wait (at most [`CONNECT_TIMEOUT`]) for ICE+DTLS. Any other status is an
    /// error carrying the status and body.
    pub async fn connect(whip_url: &str, token: &str) -> Result<WhipPublisher, ClientError> {
        Self::connect_with_timeout(whip_url, token, CONNECT_TIMEOUT).await
    }

    /// [`WhipPublisher::connect`] with an explicit ICE+DTLS timeout.
    pub async fn connect_with_timeout(
        whip_url: &str,
        token: &str,
        connect_timeout: Duration,
    ) -> Result<WhipPublisher, ClientError> {
        Self::connect_trusting(whip_url, token, connect_timeout, None).await
    }

    /// [`WhipPublisher::connect_with_timeout`], trusting the CA bundle `extra_ca` (PEM) besides
    /// the system roots for an `https://` WHIP URL.
    pub async fn connect_trusting(
        whip_url: &str,
        token: &str,
        connect_timeout: Duration,
        extra_ca: Option<&std::path::Path>,
    ) -> Result<WhipPublisher, ClientError> {
        Self::connect_via(
            signaling_client(extra_ca)?,
            whip_url,
            token,
            connect_timeout,
        )
        .await
    }

    /// [`WhipPublisher::connect_with_timeout`] over a ready signaling client `http` (a client
    /// that re-joins keeps one: building one loads the system roots, which takes a while).
    pub async fn connect_via(
        http: HttpsClient<Full<Bytes>>,
        whip_url: &str,
        token: &str,
        connect_timeout: Duration,
    ) -> Result<WhipPublisher, ClientError> {
        Self::connect_options(http, whip_url, token, connect_timeout, false).await
    }

    /// [`WhipPublisher::connect`], offering RFC 2198 RED (`red/48000/2` with Opus, as browsers
    /// do): if the edge accepts it, every packet carries the previous one as redundancy (see
    /// [`WhipPublisher::red`]).
    pub async fn connect_red(whip_url: &str, token: &str) -> Result<WhipPublisher, ClientError> {
        Self::connect_options(
            signaling_client(None)?,
            whip_url,
            token,
            CONNECT_TIMEOUT,
            true,
        )
        .await
    }

    async fn connect_options(
        http: HttpsClient<Full<Bytes>>,
        whip_url: &str,
        token: &str,
        connect_timeout: Duration,
        offer_red: bool,
    ) -> Result<WhipPublisher, ClientError> {
        let endpoint = http_endpoint(whip_url, "WHIP")?;
        let (socket, local_addr, mut rtc) =
            client_rtc(&endpoint, Some(STATS_INTERVAL), offer_red, ICE_MAX_RTO).await?;
        let mut change = rtc.sdp_api();
        let mid = change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = change
            .apply()
            .ok_or_else(|| ClientError::Rtc("no offer produced".into()))?;

        let (resource, headers, body) =
            post_offer(&http, &endpoint, token, offer.to_sdp_string()).await?;
        let etag = headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let publisher_http = WhipPublisherParts {
            resource,
            token: token.to_string(),
            http,
        };

        let answer = parse_answer(&body);
        let setup = answer.and_then(|answer| {
            rtc.sdp_api()
                .accept_answer(pending, answer)
                .map_err(rtc_err)?;
            opus_pt(&rtc, mid)
        });
        let (pt, red_pt) = match setup {
            Ok(pts) => pts,
            Err(e) => {
                publisher_http.delete_quietly().await;
                return Err(e);
            }
        };

        let (commands, command_rx) = mpsc::channel(256);
        let (connected_tx, connected_rx) = oneshot::channel();
        let remote_loss = Arc::new(AtomicU32::new(NO_LOSS_REPORT));
        let mut task = tokio::spawn(drive(
            rtc,
            Link {
                socket,
                local_addr,
                mid,
                pt,
                red_pt,
            },
            command_rx,
            connected_tx,
            remote_loss.clone(),
        ));
        let failure = match tokio::time::timeout(connect_timeout, connected_rx).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(match (&mut task).await {
                Ok(Err(e)) => e,
                _ => ClientError::Closed,
            }),
            Err(_) => {
                task.abort();
                Some(ClientError::ConnectTimeout(connect_timeout))
            }
        };
        if let Some(e) = failure {
            publisher_http.delete_quietly().await;
            return Err(e);
        }
        let WhipPublisherParts {
            resource,
            token,
            http,
        } = publisher_http;
        Ok(WhipPublisher {
            resource,
            token,
            http,
            etag,
            local_addr,
            commands,
            remote_loss,
            red: red_pt.is_some(),
            task,
        })
    }

    /// Whether RED was negotiated: every packet then carries the previous one as redundancy.
    pub fn red(&self) -> bool {
        self.red
    }

    /// The fraction of packets (0.0..=1.0) the edge's latest RTCP receiver report says were lost,
    /// as a browser's encoder would see it; `None` before the first report (str0m sends one every
    /// 5 s for audio).
    pub fn remote_loss(&self) -> Option<f32> {
        let v = f32::from_bits(self.remote_loss.load(Ordering::Relaxed));
        (v >= 0.0).then_some(v)
    }

    /// Send one 20 ms Opus packet with RTP timestamp `rtp_ts` (48 kHz) and RFC 6464 audio level
    /// `audio_level` (0 loudest ..= 127 silence).
    pub async fn send_opus(
        &mut self,
        payload: &[u8],
        rtp_ts: u32,
        audio_level: u8,
    ) -> Result<(), ClientError> {
        self.send(payload, rtp_ts, audio_level, None, None).await
    }

    /// Send the `index`-th packet of the stream (its RTP sequence number is the first one plus
    /// `index`), so a test can leave packets out or send them out of order the way a lossy,
    /// jittery network would deliver them. Do not mix with [`WhipPublisher::send_opus`].
    pub async fn send_opus_indexed(
        &mut self,
        index: u64,
        payload: &[u8],
        rtp_ts: u32,
        audio_level: u8,
    ) -> Result<(), ClientError> {
        self.send(payload, rtp_ts, audio_level, Some(index), None)
            .await
    }

    /// [`WhipPublisher::send_opus_indexed`] carrying `previous` (the RTP timestamp and payload of
    /// the packet before, lost or not) as RED redundancy if RED was negotiated (see
    /// [`WhipPublisher::red`]), so a test or bench that leaves packets out can measure what RED
    /// recovers.
    pub async fn send_opus_indexed_red(
        &mut self,
        index: u64,
        payload: &[u8],
        rtp_ts: u32,
        audio_level: u8,
        previous: Option<(u32, &[u8])>,
    ) -> Result<(), ClientError> {
        let previous = previous.map(|(ts, p)| (ts, p.to_vec()));
        self.send(payload, rtp_ts, audio_level, Some(index), previous)
            .await
    }

    async fn send(
        &mut self,
        payload: &[u8],
        rtp_ts: u32,
        audio_level: u8,
        index: Option<u64>,
        previous: Option<(u32, Vec<u8>)>,
    ) -> Result<(), ClientError> {
        self.commands
            .send(Command::Send {
                payload: payload.to_vec(),
                rtp_ts,
                audio_level: audio_level.min(127),
                index,
                previous,
            })
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The WHIP session URL (resolved `Location`).
    pub fn resource_url(&self) -> &http::Uri {
        &self.resource
    }

    /// The `ETag` of the session, if the endpoint sent one.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The local UDP address media is sent from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// DELETE the WHIP session, then stop the media task. A non-200 answer is an error.
    pub async fn close(self) -> Result<(), ClientError> {
        let parts = WhipPublisherParts {
            resource: self.resource,
            token: self.token,
            http: self.http,
        };
        let deleted = parts.delete().await;
        let _ = self.commands.send(Command::Close).await;
        match tokio::time::timeout(Duration::from_secs(2), self.task).await {
            Ok(Ok(Ok(()))) | Ok(Ok(Err(_))) | Ok(Err(_)) => {}
            Err(_) => tracing::debug!("whip client media task did not stop in time"),
        }
        deleted
    }
}

struct WhipPublisherParts {
    resource: http::Uri,
    token: String,
    http: HttpsClient<Full<Bytes>>,
}

impl WhipPublisherParts {
    async fn delete(&self) -> Result<(), ClientError> {
        let req = http::Request::delete(self.resource.clone())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (status, _, body) = exchange(&self.http, req).await?;
        if status == http::StatusCode::OK {
            Ok(())
        } else {
            Err(ClientError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        }
    }

    async fn delete_quietly(&self) {
        if let Err(e) = self.delete().await {
            tracing::debug!(error = %e, "whip client cleanup DELETE failed");
        }
    }
}

pub(crate) async fn exchange(
    http: &HttpsClient<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::StatusCode, http::HeaderMap, Bytes), ClientError> {
    let resp = tokio::time::timeout(HTTP_TIMEOUT, http.request(req))
        .await
        .map_err(|_| ClientError::Http("request timed out".into()))?
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(HTTP_TIMEOUT, Limited::new(body, MAX_ANSWER_LEN).collect())
        .await
        .map_err(|_| ClientError::Http("body timed out".into()))?
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// The negotiated Opus payload type of `mid`, and its RED payload type if RED was negotiated.
fn opus_pt(rtc: &Rtc, mid: Mid) -> Result<(Pt, Option<Pt>), ClientError> {
    let media = rtc
        .media(mid)
        .ok_or_else(|| ClientError::Sdp("answer dropped the audio m-line".into()))?;
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus && media.remote_pts().contains(&p.pt()))
        .map(|p| (p.pt(), p.red()))
        .ok_or_else(|| ClientError::Sdp("answer has no Opus payload type".into()))
}

/// The publisher's socket and negotiated audio stream.
struct Link {
    socket: UdpSocket,
    local_addr: SocketAddr,
    mid: Mid,
    pt: Pt,
    /// The RED payload type, if RED was negotiated.
    red_pt: Option<Pt>,
}

/// Drive the client `Rtc`: drain output, then wait for a command, a datagram or the timeout.
async fn drive(
    mut rtc: Rtc,
    link: Link,
    mut commands: mpsc::Receiver<Command>,
    connected: oneshot::Sender<()>,
    remote_loss: Arc<AtomicU32>,
) -> Result<(), ClientError> {
    let Link {
        socket,
        local_addr,
        mid,
        pt,
        red_pt,
    } = link;
    // With RED: the previous plain send (carried as redundancy by the next one).
    let mut last_sent: Option<(u32, Vec<u8>)> = None;
    let mut connected = Some(connected);
    let mut buf = vec![0u8; 2048];
    // Start in the first rollover period (no out-of-band ROC signalling needed).
    let first_seq: u64 = u64::from(rand::random::<u16>() & 0x7fff);
    let mut seq = first_seq;
    let mut closing = false;
    loop {
        let timeout = loop {
            match rtc.poll_output().map_err(rtc_err)? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    socket.send_to(&t.contents, t.destination).await?;
                }
                Output::Event(Event::Connected) => {
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                }
                Output::Event(Event::IceConnectionStateChange(
                    IceConnectionState::Disconnected,
                )) => {
                    return Err(ClientError::Rtc("ICE disconnected".into()));
                }
                Output::Event(Event::MediaEgressStats(s)) => {
                    if let Some(loss) = s.loss {
                        remote_loss.store(loss.to_bits(), Ordering::Relaxed);
                    }
                }
                Output::Event(_) => {}
            }
        };
        if closing || !rtc.is_alive() {
            return Ok(());
        }
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Send { payload, rtp_ts, audio_level, index, previous }) => {
                    let mut api = rtc.direct_api();
                    let stream = api
                        .stream_tx_by_mid(mid, None)
                        .ok_or_else(|| ClientError::Rtc("no send stream for the audio m-line".into()))?;
                    let ext = ExtensionValues {
                        audio_level: Some(-(audio_level as i8)),
                        voice_activity: Some(audio_level < 127),
                        ..Default::default()
                    };
                    let this_seq = index.map_or(seq, |i| first_seq + i);
                    let (wire_pt, wire) = match red_pt {
                        Some(red_pt) => {
                            let previous = if index.is_some() {
                                previous
                            } else {
                                last_sent.replace((rtp_ts, payload.clone()))
                            };
                            let mut wrapped = Vec::with_capacity(payload.len() * 2 + 5);
                            amphi_edge::red::encode_into(
                                &mut wrapped,
                                *pt,
                                previous
                                    .as_ref()
                                    .map(|(ts, p)| (rtp_ts.wrapping_sub(*ts), p.as_slice())),
                                &payload,
                            );
                            (red_pt, wrapped)
                        }
                        None => (pt, payload),
                    };
                    stream.write_rtp(
                        RtpWrite::new(wire_pt, this_seq.into(), rtp_ts, Instant::now(), wire)
                            .ext_vals(ext),
                    );
                    seq = seq.max(this_seq + 1);
                }
                Some(Command::Close) | None => {
                    rtc.close().map_err(rtc_err)?;
                    closing = true;
                }
            },
            r = socket.recv_from(&mut buf) => {
                let (n, source) = r?;
                if let Ok(contents) = DatagramRecv::try_from(&buf[..n]) {
                    let input = Input::Receive(
                        Instant::now(),
                        Receive { proto: Protocol::Udp, source, destination: local_addr, contents },
                    );
                    rtc.handle_input(input).map_err(rtc_err)?;
                }
            }
            _ = tokio::time::sleep_until(timeout.into()) => {
                rtc.handle_input(Input::Timeout(Instant::now())).map_err(rtc_err)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_resolves_against_the_endpoint() {
        let ep: http::Uri = "http://127.0.0.1:8101/whip/00000000000000aa"
            .parse()
            .unwrap();
        assert_eq!(
            resolve_location(&ep, "/whip/00000000000000aa/abc").unwrap(),
            "http://127.0.0.1:8101/whip/00000000000000aa/abc"
        );
        assert_eq!(
            resolve_location(&ep, "http://other:1/x").unwrap(),
            "http://other:1/x"
        );
        assert!(resolve_location(&ep, "not a url").is_err());
    }
}
