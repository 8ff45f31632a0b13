//! The relay tree's driver: runs [`TreePlan`] between the push hub's subscriptions, the router's
//! choice of parent (from the heartbeat answers) and the origins, and pulls each fed room from
//! the parent edge.
//!
//! A feed is an ordinary push stream of the parent (`GET /v1/rooms/{room}/push?relay=<grant>`,
//! `docs/push.md`), read over a WebSocket: `http://` or `https://` (system roots plus the edge's
//! `tls_ca`) at the parent's `relay_url`. Its audio messages go to the push hub as if their frames
//! came from an origin. A feed that cannot connect within [`CONNECT_TIMEOUT`], or is silent for
//! [`SILENCE`] (the program runs at 50 frames a second while the room lives), is lost: the plan
//! moves the room to the origins.

use crate::push::PushOutput;
use crate::push_fanout::CLOSE_ENDED;
use crate::push_hub::PushHub;
use crate::push_tree::{TreeOutput, TreePlan};
use amphi_protocol::api::RelayParent;
use amphi_protocol::push::AudioMessage;
use amphi_protocol::RoomId;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A feed that has not finished its WebSocket handshake by then has failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A feed silent this long is lost.
pub const SILENCE: Duration = Duration::from_secs(3);
/// Largest message accepted from a parent (an audio message is at most 50 frames).
const MAX_MESSAGE: usize = 64 * 1024;

/// What a feed task reports.
enum FeedEvent {
    Live { room: RoomId, feed: u64 },
    Lost { room: RoomId, feed: u64 },
}

/// Everything the driver needs.
pub(crate) struct PushFeeds {
    /// The push listeners' hub: frames go there, its subscriptions come from there.
    pub hub: Arc<PushHub>,
    /// The hub's subscriptions.
    pub subscriptions: mpsc::UnboundedReceiver<PushOutput>,
    /// The router's latest choice of parent.
    pub parent: watch::Receiver<Option<RelayParent>>,
    /// Subscriptions for the origins (read by the uplink).
    pub to_origins: mpsc::UnboundedSender<PushOutput>,
    /// The rooms subscribed at the origins now (the uplink announces them on every new link);
    /// updated before the messages that change it are sent.
    pub origin_rooms: watch::Sender<Vec<RoomId>>,
    /// TLS for `https://` parents.
    pub tls: Arc<rustls::ClientConfig>,
    /// The server name checked on `https://` parents' certificates (`None`: the URL's host).
    pub server_name: Option<String>,
}

impl PushFeeds {
    /// Run until `shutdown` (or until the hub goes away).
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut plan = TreePlan::new();
        let mut feeds: HashMap<u64, CancellationToken> = HashMap::new();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        plan.set_parent(self.parent.borrow_and_update().clone());
        let mut registered = true;
        loop {
            let wake = plan
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                sub = self.subscriptions.recv() => match sub {
                    Some(PushOutput::Subscribe(room)) => plan.subscribe(room),
                    Some(PushOutput::Unsubscribe(room)) => plan.unsubscribe(room),
                    None => break,
                },
                changed = self.parent.changed(), if registered => match changed {
                    Ok(()) => plan.set_parent(self.parent.borrow_and_update().clone()),
                    // No registration (any more): the parent stays as last named.
                    Err(_) => registered = false,
                },
                Some(ev) = events.recv() => match ev {
                    FeedEvent::Live { room, feed } => plan.feed_live(room, feed),
                    FeedEvent::Lost { room, feed } => {
                        feeds.remove(&feed);
                        if plan.is_subscribed(room) {
                            self.hub.metrics.push_feed_failures.inc();
                        }
                        plan.feed_lost(room, feed, Instant::now());
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => plan.handle_timeout(Instant::now()),
            }
            let outputs: Vec<TreeOutput> = std::iter::from_fn(|| plan.poll_output()).collect();
            self.origin_rooms.send_replace(plan.from_origins());
            for out in outputs {
                match out {
                    TreeOutput::Origins(out) => {
                        let _ = self.to_origins.send(out);
                    }
                    TreeOutput::Open {
                        room,
                        feed,
                        url,
                        grant,
                    } => {
                        let cancel = shutdown.child_token();
                        feeds.insert(feed, cancel.clone());
                        let pull = Pull {
                            room,
                            feed,
                            url,
                            grant,
                            after: self.hub.last_ts(room),
                            hub: self.hub.clone(),
                            tls: self.tls.clone(),
                            server_name: self.server_name.clone(),
                        };
                        let events = events_tx.clone();
                        tokio::spawn(async move {
                            let outcome = tokio::select! {
                                _ = cancel.cancelled() => return,
                                r = pull.run(&events) => r,
                            };
                            if let Err(e) = outcome {
                                tracing::info!(%room, feed, error = %e, "relay feed lost");
                            }
                            let _ = events.send(FeedEvent::Lost { room, feed });
                        });
                    }
                    TreeOutput::Close { feed, .. } => {
                        if let Some(cancel) = feeds.remove(&feed) {
                            cancel.cancel();
                        }
                    }
                }
            }
            self.hub
                .metrics
                .push_fed_rooms
                .set(i64::try_from(plan.fed_rooms()).unwrap_or(i64::MAX));
        }
        for cancel in feeds.into_values() {
            cancel.cancel();
        }
    }
}

/// Why a feed ended.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("bad relay URL {0:?}")]
    Url(String),
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("timed out")]
    Timeout,
    #[error("bad audio message: {0}")]
    Message(#[from] amphi_protocol::push::PushError),
    #[error("the parent closed the feed ({0})")]
    Closed(String),
}

/// One feed: a room's push stream from the parent.
struct Pull {
    room: RoomId,
    feed: u64,
    url: String,
    grant: String,
    after: Option<u64>,
    hub: Arc<PushHub>,
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl Pull {
    async fn run(&self, events: &mpsc::UnboundedSender<FeedEvent>) -> Result<(), FeedError> {
        let addr = parent_addr(&self.url).ok_or_else(|| FeedError::Url(self.url.clone()))?;
        let after = self
            .after
            .map(|ts| format!("&after={ts}"))
            .unwrap_or_default();
        let target = format!(
            "{}://{}/v1/rooms/{}/push?relay={}{after}",
            if addr.secure { "wss" } else { "ws" },
            addr.authority,
            self.room,
            self.grant
        );
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(addr.authority.as_str()),
        )
        .await
        .map_err(|_| FeedError::Timeout)??;
        let _ = tcp.set_nodelay(true);
        if addr.secure {
            let host = self.server_name.as_deref().unwrap_or(&addr.host);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| FeedError::Url(self.url.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone());
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| FeedError::Timeout)??;
            self.read(target, stream, events).await
        } else {
            self.read(target, tcp, events).await
        }
    }

    /// The WebSocket handshake on `stream`, then the messages until the feed ends.
    async fn read<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        target: String,
        stream: S,
        events: &mpsc::UnboundedSender<FeedEvent>,
    ) -> Result<(), FeedError> {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let (mut ws, _) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::client_async_with_config(target, stream, Some(config)),
        )
        .await
        .map_err(|_| FeedError::Timeout)??;
        let mut live = false;
        loop {
            let msg = tokio::time::timeout(SILENCE, ws.next())
                .await
                .map_err(|_| FeedError::Timeout)?;
            match msg {
                None => return Err(FeedError::Closed("end of stream".into())),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(bytes))) => {
                    let audio = AudioMessage::decode(&bytes)?;
                    self.hub.feed_message(self.room, &audio);
                    if !live {
                        live = true;
                        let _ = events.send(FeedEvent::Live {
                            room: self.room,
                            feed: self.feed,
                        });
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map(|f| f.code);
                    if code == Some(CloseCode::from(CLOSE_ENDED)) {
                        self.hub.room_ended(self.room);
                    }
                    return Err(FeedError::Closed(
                        code.map_or("no code".into(), |c| u16::from(c).to_string()),
                    ));
                }
                // The header (text), pings and pongs.
                Some(Ok(_)) => {}
            }
        }
    }
}

/// A parent's address: `https`, `host:port` (the scheme's port when the URL has none) and host.
#[derive(Debug, PartialEq, Eq)]
struct ParentAddr {
    secure: bool,
    authority: String,
    host: String,
}

/// The address of an `http(s)://host[:port][/]` URL (a base URL: no user info, path or query).
fn parent_addr(url: &str) -> Option<ParentAddr> {
    let uri: http::Uri = url.parse().ok()?;
    let secure = match uri.scheme_str()? {
        "https" => true,
        "http" => false,
        _ => return None,
    };
    let authority = uri.authority()?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some()
    {
        return None;
    }
    // `host()` keeps an IPv6 literal's brackets, as `host:port` needs them.
    let host = authority.host();
    let port = match authority.port_u16() {
        Some(p) => p,
        // Text after the host that is not a port number (`http::Uri` drops it).
        None if authority.as_str() != host => return None,
        None if secure => 443,
        None => 80,
    };
    if host.is_empty() {
        return None;
    }
    Some(ParentAddr {
        secure,
        authority: format!("{host}:{port}"),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_need_a_scheme_and_a_host_and_default_to_the_schemes_port() {
        let addr = |secure, authority: &str, host: &str| {
            Some(ParentAddr {
                secure,
                authority: authority.into(),
                host: host.into(),
            })
        };
        assert_eq!(
            parent_addr("http://10.0.0.5:8080"),
            addr(false, "10.0.0.5:8080", "10.0.0.5")
        );
        assert_eq!(
            parent_addr("https://[::1]:8443/"),
            addr(true, "[::1]:8443", "::1")
        );
        assert_eq!(
            parent_addr("https://edge-7.internal"),
            addr(true, "edge-7.internal:443", "edge-7.internal")
        );
        assert_eq!(parent_addr("http://[::1]"), addr(false, "[::1]:80", "::1"));
        assert_eq!(parent_addr("http://10.0.0.5:8080/base"), None);
        assert_eq!(parent_addr("http://10.0.0.5:99999"), None);
        assert_eq!(parent_addr("http://user@10.0.0.5:80"), None);
        assert_eq!(parent_addr("ftp://10.0.0.5:21"), None);
        assert_eq!(parent_addr("http://:80"), None);
        assert_eq!(parent_addr("http://"), None);
    }
}
