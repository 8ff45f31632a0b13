//! A quinn origin stand-in with a small room authority: answers `Join` with `RoomSnapshot`,
//! applies commands (host-only moderation), broadcasts `RoomEvents` to every subscribed edge,
//! bans on kick, and relays speaker datagrams between edges subscribed to the same room.

use amphi_common::mtls::{DevPki, MeshRole};
use amphi_protocol::control::{ControlDecoder, ControlMessage};
use amphi_protocol::relay::RelayFrame;
use amphi_protocol::room::{
    Participant, Report, RoomCommand, RoomEvent, RoomPhase, RoomRole, RoomState,
};
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

#[derive(Default)]
struct Shared {
    next_conn: u64,
    edges: BTreeMap<u64, (mpsc::UnboundedSender<ControlMessage>, quinn::Connection)>,
    subs: BTreeMap<RoomId, BTreeSet<u64>>,
    rooms: BTreeMap<RoomId, RoomState>,
}

/// The stand-in.
pub struct Authority {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    /// Every control message received from edges.
    pub control: mpsc::UnboundedReceiver<ControlMessage>,
    pub endpoint: quinn::Endpoint,
}

impl Authority {
    /// The authoritative state of `room`.
    pub fn state(&self, room: RoomId) -> Option<RoomState> {
        self.shared.lock().unwrap().rooms.get(&room).cloned()
    }
}

fn apply(
    st: &mut RoomState,
    actor: ParticipantId,
    cmd: RoomCommand,
) -> Result<Vec<RoomEvent>, (&'static str, String)> {
    let role_of = |st: &RoomState, id: ParticipantId| {
        st.participants.iter().find(|p| p.id == id).map(|p| p.role)
    };
    let moderator = matches!(role_of(st, actor), Some(RoomRole::Host | RoomRole::Cohost));
    let need_mod = || Err(("forbidden", "moderators only".to_string()));
    Ok(match cmd {
        RoomCommand::Join {
            user,
            name,
            role,
            region,
            resume,
        } => {
            if st.banned.contains(&user) {
                return Err(("banned", "you were removed from this room".into()));
            }
            if st.phase == RoomPhase::Ended {
                return Err(("room_ended", "the room has ended".into()));
            }
            let p = Participant {
                id: actor,
                user,
                name,
                role: resume.unwrap_or(RoomRole::from_token(role)),
                region,
                muted: false,
            };
            st.participants.retain(|x| x.id != actor);
            st.participants.push(p.clone());
            vec![RoomEvent::ParticipantJoined { participant: p }]
        }
        RoomCommand::Leave => {
            st.participants.retain(|x| x.id != actor);
            st.hands.retain(|h| *h != actor);
            vec![RoomEvent::ParticipantLeft { id: actor }]
        }
        RoomCommand::RaiseHand => {
            st.hands.push(actor);
            vec![RoomEvent::HandRaised { id: actor }]
        }
        RoomCommand::LowerHand { target } => {
            let id = target.unwrap_or(actor);
            st.hands.retain(|h| *h != id);
            vec![RoomEvent::HandLowered { id }]
        }
        RoomCommand::Promote { target, role } => {
            if !moderator {
                return need_mod();
            }
            for p in st.participants.iter_mut().filter(|p| p.id == target) {
                p.role = role;
            }
            st.hands.retain(|h| *h != target);
            vec![
                RoomEvent::RoleChanged {
                    id: target,
                    role,
                    by: actor,
                },
                RoomEvent::HandLowered { id: target },
            ]
        }
        RoomCommand::Demote { target } => {
            if !moderator {
                return need_mod();
            }
            for p in st.participants.iter_mut().filter(|p| p.id == target) {
                p.role = RoomRole::Listener;
            }
            vec![RoomEvent::RoleChanged {
                id: target,
                role: RoomRole::Listener,
                by: actor,
            }]
        }
        RoomCommand::Mute { target } => {
            let id = target.unwrap_or(actor);
            if id != actor && !moderator {
                return need_mod();
            }
            for p in st.participants.iter_mut().filter(|p| p.id == id) {
                p.muted = true;
            }
            vec![RoomEvent::Muted { id, by: actor }]
        }
        RoomCommand::Unmute => {
            for p in st.participants.iter_mut().filter(|p| p.id == actor) {
                p.muted = false;
            }
            vec![RoomEvent::Unmuted { id: actor }]
        }
        RoomCommand::Kick { target } => {
            if !moderator {
                return need_mod();
            }
            if let Some(p) = st.participants.iter().find(|p| p.id == target) {
                st.banned.push(p.user.clone());
            }
            st.participants.retain(|p| p.id != target);
            vec![RoomEvent::Kicked {
                id: target,
                by: actor,
            }]
        }
        RoomCommand::End => {
            if role_of(st, actor) != Some(RoomRole::Host) {
                return need_mod();
            }
            st.phase = RoomPhase::Ended;
            vec![RoomEvent::Ended { by: Some(actor) }]
        }
        RoomCommand::Chat { text } => vec![RoomEvent::Chat {
            from: actor,
            name: "x".into(),
            text,
            at_ms: 0,
        }],
        RoomCommand::React { emoji } => vec![RoomEvent::Reaction { from: actor, emoji }],
        RoomCommand::Report {
            target,
            reason,
            text,
        } => {
            let Some(reporter) = st.participants.iter().find(|p| p.id == actor) else {
                return Err(("not_found", "you are not in the room".into()));
            };
            vec![RoomEvent::Reported {
                report: Report {
                    id: format!("report-{actor}"),
                    room: st.room,
                    reporter: reporter.user.clone(),
                    reporter_name: reporter.name.clone(),
                    reporter_id: actor,
                    target,
                    target_name: None,
                    reason,
                    text,
                    at_ms: 0,
                    program_ms: None,
                },
            }]
        }
    })
}

fn on_message(shared: &Arc<Mutex<Shared>>, conn: u64, msg: ControlMessage) {
    let mut sh = shared.lock().unwrap();
    match msg {
        ControlMessage::SubscribeRoom { room } => {
            sh.subs.entry(room).or_default().insert(conn);
        }
        ControlMessage::UnsubscribeRoom { room } => {
            if let Some(s) = sh.subs.get_mut(&room) {
                s.remove(&conn);
            }
        }
        ControlMessage::RoomCommand {
            room,
            actor,
            request,
            command,
        } => {
            let is_join = matches!(command, RoomCommand::Join { .. });
            let st = sh.rooms.entry(room).or_insert_with(|| RoomState {
                room,
                phase: RoomPhase::Live,
                participants: vec![],
                hands: vec![],
                banned: vec![],
            });
            match apply(st, actor, command) {
                Ok(events) => {
                    let snapshot = st.clone();
                    let ended = events.iter().any(|e| matches!(e, RoomEvent::Ended { .. }));
                    if is_join {
                        if let Some((tx, _)) = sh.edges.get(&conn) {
                            let _ = tx.send(ControlMessage::RoomSnapshot {
                                state: snapshot,
                                more: false,
                            });
                        }
                    }
                    let subs: Vec<u64> = sh
                        .subs
                        .get(&room)
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default();
                    for s in subs {
                        if let Some((tx, _)) = sh.edges.get(&s) {
                            let _ = tx.send(ControlMessage::RoomEvents {
                                room,
                                events: events.clone(),
                            });
                            if ended {
                                let _ = tx.send(ControlMessage::RoomEnded { room });
                            }
                        }
                    }
                }
                Err((code, message)) => {
                    if let Some((tx, _)) = sh.edges.get(&conn) {
                        let _ = tx.send(ControlMessage::CommandRejected {
                            room,
                            actor,
                            request,
                            code: code.into(),
                            message,
                        });
                    }
                }
            }
        }
        _ => {}
    }
}

/// Start the stand-in on `bind` with mTLS from `pki`.
pub fn start_authority(pki: &DevPki, bind: SocketAddr) -> Authority {
    let material = pki.issue(super::ORIGIN_NAME, MeshRole::Origin).unwrap();
    let tls = quinn::crypto::rustls::QuicServerConfig::try_from(material.server_config().unwrap())
        .unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(tls));
    let endpoint = quinn::Endpoint::server(server, bind).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (ctl_tx, control) = mpsc::unbounded_channel();
    let ep = endpoint.clone();
    let sh = shared.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ControlMessage>();
            let id = {
                let mut s = sh.lock().unwrap();
                s.next_conn += 1;
                let id = s.next_conn;
                s.edges.insert(id, (out_tx, conn.clone()));
                id
            };
            // Relay speaker datagrams to the other edges subscribed to the room.
            let (c2, sh2) = (conn.clone(), sh.clone());
            tokio::spawn(async move {
                while let Ok(d) = c2.read_datagram().await {
                    let Ok(frame) = RelayFrame::decode(&d) else {
                        continue;
                    };
                    let s = sh2.lock().unwrap();
                    for sub in s.subs.get(&frame.room).into_iter().flatten() {
                        if *sub != id {
                            if let Some((_, c)) = s.edges.get(sub) {
                                let _ = c.send_datagram(d.clone());
                            }
                        }
                    }
                }
            });
            let (ctl_tx, sh3) = (ctl_tx.clone(), sh.clone());
            tokio::spawn(async move {
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut dec = ControlDecoder::default();
                let mut buf = vec![0u8; 4096];
                loop {
                    tokio::select! {
                        m = out_rx.recv() => match m {
                            Some(m) => { let _ = send.write_all(&m.to_record()).await; }
                            None => break,
                        },
                        r = recv.read(&mut buf) => {
                            let Ok(Some(n)) = r else { break };
                            dec.feed(&buf[..n]);
                            while let Ok(Some(msg)) = dec.next_message() {
                                if matches!(msg, ControlMessage::Hello { .. }) {
                                    let welcome = ControlMessage::Welcome { origin: "authority".into() };
                                    let _ = send.write_all(&welcome.to_record()).await;
                                }
                                let _ = ctl_tx.send(msg.clone());
                                on_message(&sh3, id, msg);
                            }
                        }
                    }
                }
                let mut s = sh3.lock().unwrap();
                s.edges.remove(&id);
                for subs in s.subs.values_mut() {
                    subs.remove(&id);
                }
            });
        }
    });
    Authority {
        addr,
        shared,
        control,
        endpoint,
    }
}
