//! A real WHEP receive-only client built on str0m: [`LISTENER_AUDIO_SLOTS`] recvonly Opus tracks.
//!
//! Used by end-to-end tests and by `amphi-tools loadgen webrtc`. [`WhepSubscriber::connect`] POSTs the
//! offer with `Authorization: Bearer <token>`, applies the answer, then a background task drives
//! ICE, DTLS and SRTP on a UDP socket bound to 127.0.0.1:0 and exposes every received RTP packet
//! (slot, SSRC, sequence number, timestamp, RFC 6464 level, payload).

use crate::whip_client::{
    client_rtc, exchange, http_endpoint, parse_answer, post_offer, rtc_err, signaling_client,
    ClientError, CONNECT_TIMEOUT,
};
use amphi_protocol::https::HttpsClient;
use amphi_protocol::room::LISTENER_AUDIO_SLOTS;
use bytes::Bytes;
use http::header;
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Capacity of the received-packet queue; beyond it packets are counted but not queued.
const PACKET_QUEUE: usize = 4096;

/// One RTP packet received on a slot.
#[derive(Clone, Debug)]
pub struct ReceivedPacket {
    /// Slot index (order of the offer's m-lines).
    pub slot: usize,
    /// RTP SSRC.
    pub ssrc: u32,
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp (48 kHz).
    pub ts: u32,
    /// RFC 6464 level (0 loudest .. 127 silent), if the extension was present.
    pub audio_level: Option<u8>,
    /// Opus payload.
    pub payload: Arc<[u8]>,
    /// When it was decrypted here.
    pub at: Instant,
}

/// Counters of a subscriber, readable while it runs.
#[derive(Debug, Default)]
pub struct WhepStats {
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl WhepStats {
    /// RTP packets received.
    pub fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    /// Payload bytes received.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Options of [`WhepSubscriber::connect_with`].
#[derive(Clone, Debug)]
pub struct WhepOptions {
    /// Bound on ICE+DTLS connection time.
    pub connect_timeout: Duration,
    /// Queue received packets for [`WhepSubscriber::recv`] (off: count only, for load tests).
    pub keep_packets: bool,
    /// CA bundle (PEM) trusted besides the system roots for an `https://` WHEP URL.
    pub extra_ca: Option<std::path::PathBuf>,
    /// A ready signaling client, used instead of building one from `extra_ca` (a client that
    /// re-joins keeps one: building one loads the system roots, which takes a while).
    pub http: Option<HttpsClient<Full<Bytes>>>,
    /// How often the connected ICE pair is checked: every 250 ms by default, so a dead edge is
    /// noticed in about a second; Chrome checks a stable connection every 2.5 s (load tests
    /// that stand in for browsers use that).
    pub ice_check_every: Duration,
}

impl Default for WhepOptions {
    fn default() -> Self {
        WhepOptions {
            connect_timeout: CONNECT_TIMEOUT,
            keep_packets: true,
            extra_ca: None,
            http: None,
            ice_check_every: crate::whip_client::ICE_MAX_RTO,
        }
    }
}

/// A connected WHEP subscriber.
pub struct WhepSubscriber {
    resource: http::Uri,
    token: String,
    http: HttpsClient<Full<Bytes>>,
    local_addr: SocketAddr,
    packets: mpsc::Receiver<ReceivedPacket>,
    stats: Arc<WhepStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl WhepSubscriber {
    /// POST a recvonly offer with [`LISTENER_AUDIO_SLOTS`] Opus m-lines to `whep_url`; on 201
    /// apply the answer and wait for ICE+DTLS. Any other status is an error with status and body.
    pub async fn connect(whep_url: &str, token: &str) -> Result<WhepSubscriber, ClientError> {
        Self::connect_with(whep_url, token, WhepOptions::default()).await
    }

    /// [`WhepSubscriber::connect`] with options.
    pub async fn connect_with(
        whep_url: &str,
        token: &str,
        opts: WhepOptions,
    ) -> Result<WhepSubscriber, ClientError> {
        let endpoint = http_endpoint(whep_url, "WHEP")?;
        let (socket, local_addr, mut rtc) =
            client_rtc(&endpoint, None, false, opts.ice_check_every).await?;
        let mut change = rtc.sdp_api();
        let mids: Vec<Mid> = (0..LISTENER_AUDIO_SLOTS)
            .map(|_| change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None))
            .collect();
        let (offer, pending) = change
            .apply()
            .ok_or_else(|| ClientError::Rtc("no offer produced".into()))?;
        let http = match opts.http {
            Some(http) => http,
            None => signaling_client(opts.extra_ca.as_deref())?,
        };
        let (resource, _headers, body) =
            post_offer(&http, &endpoint, token, offer.to_sdp_string()).await?;
        let mut sub_parts = Parts {
            resource,
            token: token.to_string(),
            http,
        };
        let applied = parse_answer(&body).and_then(|answer| {
            rtc.sdp_api()
                .accept_answer(pending, answer)
                .map_err(rtc_err)
        });
        if let Err(e) = applied {
            sub_parts.delete_quietly().await;
            return Err(e);
        }
        let stats = Arc::new(WhepStats::default());
        let (packets_tx, packets) = mpsc::channel(PACKET_QUEUE);
        let (connected_tx, connected_rx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel();
        let mut task = tokio::spawn(drive(Driver {
            rtc,
            socket,
            local_addr,
            mids,
            packets: opts.keep_packets.then_some(packets_tx),
            stats: stats.clone(),
            connected: Some(connected_tx),
            stop: stop_rx,
        }));
        let failure = match tokio::time::timeout(opts.connect_timeout, connected_rx).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(match (&mut task).await {
                Ok(Err(e)) => e,
                _ => ClientError::Closed,
            }),
            Err(_) => {
                task.abort();
                Some(ClientError::ConnectTimeout(opts.connect_timeout))
            }
        };
        if let Some(e) = failure {
            sub_parts.delete_quietly().await;
            return Err(e);
        }
        let Parts {
            resource,
            token,
            http,
        } = sub_parts;
        Ok(WhepSubscriber {
            resource,
            token,
            http,
            local_addr,
            packets,
            stats,
            stop: Some(stop),
            task,
        })
    }

    /// The next received packet (`None` once the media task stopped and the queue is empty).
    pub async fn recv(&mut self) -> Option<ReceivedPacket> {
        self.packets.recv().await
    }

    /// A received packet if one is queued.
    pub fn try_recv(&mut self) -> Option<ReceivedPacket> {
        self.packets.try_recv().ok()
    }

    /// Counters.
    pub fn stats(&self) -> Arc<WhepStats> {
        self.stats.clone()
    }

    /// The WHEP session URL (resolved `Location`).
    pub fn resource_url(&self) -> &http::Uri {
        &self.resource
    }

    /// The local UDP address media arrives at.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the media task is still running (false after the edge closed the session).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// DELETE the WHEP session, then stop the media task. A non-200 answer is an error.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let parts = Parts {
            resource: self.resource.clone(),
            token: self.token.clone(),
            http: self.http.clone(),
        };
        let deleted = parts.delete().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        deleted
    }
}

struct Parts {
    resource: http::Uri,
    token: String,
    http: HttpsClient<Full<Bytes>>,
}

impl Parts {
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

    async fn delete_quietly(&mut self) {
        if let Err(e) = self.delete().await {
            tracing::debug!(error = %e, "whep client cleanup DELETE failed");
        }
    }
}

struct Driver {
    rtc: Rtc,
    socket: UdpSocket,
    local_addr: SocketAddr,
    mids: Vec<Mid>,
    packets: Option<mpsc::Sender<ReceivedPacket>>,
    stats: Arc<WhepStats>,
    connected: Option<oneshot::Sender<()>>,
    stop: oneshot::Receiver<()>,
}

async fn drive(mut d: Driver) -> Result<(), ClientError> {
    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = loop {
            match d.rtc.poll_output().map_err(rtc_err)? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = d.socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(Event::Connected) => {
                    if let Some(tx) = d.connected.take() {
                        let _ = tx.send(());
                    }
                }
                Output::Event(Event::IceConnectionStateChange(
                    IceConnectionState::Disconnected,
                )) => return Err(ClientError::Rtc("ICE disconnected".into())),
                Output::Event(Event::RtpPacket(pkt)) => {
                    d.stats.packets.fetch_add(1, Ordering::Relaxed);
                    d.stats
                        .bytes
                        .fetch_add(pkt.payload.len() as u64, Ordering::Relaxed);
                    if let Some(tx) = &d.packets {
                        let slot = d
                            .rtc
                            .direct_api()
                            .stream_rx(&pkt.header.ssrc)
                            .map(|s| s.mid())
                            .and_then(|mid| d.mids.iter().position(|m| *m == mid))
                            .unwrap_or(usize::MAX);
                        let _ = tx.try_send(ReceivedPacket {
                            slot,
                            ssrc: *pkt.header.ssrc,
                            seq: pkt.header.sequence_number,
                            ts: pkt.header.timestamp,
                            audio_level: pkt
                                .header
                                .ext_vals
                                .audio_level
                                .map(|v| (-(v as i16)).clamp(0, 127) as u8),
                            payload: pkt.payload.clone(),
                            at: pkt.timestamp,
                        });
                    }
                }
                Output::Event(Event::Closed) => return Ok(()),
                Output::Event(_) => {}
            }
        };
        if !d.rtc.is_alive() {
            return Ok(());
        }
        tokio::select! {
            _ = &mut d.stop => {
                d.rtc.disconnect();
                return Ok(());
            }
            r = d.socket.recv_from(&mut buf) => {
                let (n, source) = r?;
                if let Ok(contents) = DatagramRecv::try_from(&buf[..n]) {
                    let input = Input::Receive(
                        Instant::now(),
                        Receive { proto: Protocol::Udp, source, destination: d.local_addr, contents },
                    );
                    d.rtc.handle_input(input).map_err(rtc_err)?;
                }
            }
            _ = tokio::time::sleep_until(timeout.into()) => {
                d.rtc.handle_input(Input::Timeout(Instant::now())).map_err(rtc_err)?;
            }
        }
    }
}
