//! Rooms: participants, roles, hands, moderation. The vocabulary shared by the origin's `Room`
//! authority (fed [`RoomCommand`]s over the edge <-> origin control stream, emitting [`RoomEvent`]s),
//! the edges' replicas, and the client WebSocket signaling at `/v1/ws` ([`ClientMessage`] in,
//! [`ServerMessage`] out). See `docs/signaling.md`.

use crate::ids::{ParticipantId, RoomId};
use crate::token::Role;
use serde::{Deserialize, Serialize};

/// Longest chat message, in characters.
pub const MAX_CHAT_CHARS: usize = 500;
/// Longest reaction (an emoji or a short word), in characters.
pub const MAX_REACTION_CHARS: usize = 16;
/// Largest WebSocket text message a client may send, in bytes (an SDP offer fits comfortably).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024;
/// Audio slots an interactive listener receives: the loudest speakers, forwarded, not mixed.
pub const LISTENER_AUDIO_SLOTS: usize = 3;
/// Rooms with at most this many participants send clients everyone in `snapshot` and every
/// join and leave; larger rooms send the listeners on request (`list_participants`) and their
/// number in `counts` (see `docs/signaling.md`).
pub const FULL_LIST_MAX_PARTICIPANTS: usize = 200;
/// Most participants in one `participants` page.
pub const PARTICIPANT_PAGE_MAX: usize = 500;
/// Longest free text of a report, in characters.
pub const MAX_REPORT_TEXT_CHARS: usize = 500;

/// Why a participant or a room is reported (a fixed list; `other` with the free text for the
/// rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportReason {
    /// Unsolicited promotion, flooding, scams.
    Spam,
    /// Harassment or bullying of someone.
    Harassment,
    /// Hate speech against a group.
    Hate,
    /// Threats or incitement to violence.
    Violence,
    /// Sexual content.
    Sexual,
    /// Self-harm or suicide.
    SelfHarm,
    /// Pretending to be someone else.
    Impersonation,
    /// Anything else (say what in the text).
    Other,
}

impl ReportReason {
    /// Every reason, in the order clients list them.
    pub const ALL: [ReportReason; 8] = [
        ReportReason::Spam,
        ReportReason::Harassment,
        ReportReason::Hate,
        ReportReason::Violence,
        ReportReason::Sexual,
        ReportReason::SelfHarm,
        ReportReason::Impersonation,
        ReportReason::Other,
    ];

    /// The wire name (`spam`, `harassment`, `hate`, `violence`, `sexual`, `self_harm`,
    /// `impersonation`, `other`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReportReason::Spam => "spam",
            ReportReason::Harassment => "harassment",
            ReportReason::Hate => "hate",
            ReportReason::Violence => "violence",
            ReportReason::Sexual => "sexual",
            ReportReason::SelfHarm => "self_harm",
            ReportReason::Impersonation => "impersonation",
            ReportReason::Other => "other",
        }
    }
}

/// What a report is about: the whole room (`"room"`) or one user (`{"user": "<token sub>"}`),
/// present, gone or kicked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportTarget {
    /// The room as a whole (its topic, its hosts' conduct).
    Room,
    /// A user (token `sub`) who is or was in the room.
    User(String),
}

/// A report as the room authority accepted it: sent live to the room's hosts and co-hosts
/// (`reported`), to the geo-routers (stored, listed at `GET /v1/rooms/{id}/reports`, the
/// `report_created` webhook).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Unique id (the origin that accepted it chose it); stores deduplicate by it.
    pub id: String,
    /// The room.
    pub room: RoomId,
    /// The reporting user (token `sub`).
    pub reporter: String,
    /// The reporter's display name.
    pub reporter_name: String,
    /// The reporter's participant id at the time.
    pub reporter_id: ParticipantId,
    /// What is reported.
    pub target: ReportTarget,
    /// The reported user's display name, if the room knows it (present at the time).
    #[serde(default)]
    pub target_name: Option<String>,
    /// Why.
    pub reason: ReportReason,
    /// Free text, at most [`MAX_REPORT_TEXT_CHARS`] characters (may be empty).
    #[serde(default)]
    pub text: String,
    /// Unix milliseconds at the authority.
    pub at_ms: u64,
    /// Where the room's program (and so its recording) was when the report was made, in
    /// milliseconds from the program's start; absent when no program was running.
    #[serde(default)]
    pub program_ms: Option<u64>,
}

/// A participant's role inside a running room (tokens carry only host, speaker or listener;
/// co-hosts are named by a host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomRole {
    /// Created the room (or holds a host token): everything.
    Host,
    /// Named by a host: moderates (promote, demote, mute, kick) but cannot end the room, name
    /// co-hosts, or act on hosts (the permission table is in `docs/signaling.md`).
    Cohost,
    /// Publishes audio.
    Speaker,
    /// Listens; may raise a hand, chat and react.
    Listener,
}

impl RoomRole {
    /// Every role, most privileged first.
    pub const ALL: [RoomRole; 4] = [
        RoomRole::Host,
        RoomRole::Cohost,
        RoomRole::Speaker,
        RoomRole::Listener,
    ];

    /// The role's wire name (`host`, `cohost`, `speaker`, `listener`), also its metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomRole::Host => "host",
            RoomRole::Cohost => "cohost",
            RoomRole::Speaker => "speaker",
            RoomRole::Listener => "listener",
        }
    }

    /// The role a token grants on join.
    pub fn from_token(role: Role) -> Self {
        match role {
            Role::Host => RoomRole::Host,
            Role::Speaker => RoomRole::Speaker,
            Role::Listener => RoomRole::Listener,
        }
    }

    /// Whether this role may publish audio.
    pub fn may_publish(self) -> bool {
        !matches!(self, RoomRole::Listener)
    }

    /// Whether this role may moderate others (promote, demote, mute, kick).
    pub fn may_moderate(self) -> bool {
        matches!(self, RoomRole::Host | RoomRole::Cohost)
    }
}

/// One participant as every replica sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    /// Media and signaling id in this room.
    pub id: ParticipantId,
    /// Stable user identity (token `sub`); bans apply to it.
    pub user: String,
    /// Display name.
    pub name: String,
    /// Current role.
    pub role: RoomRole,
    /// Region of the edge the participant is connected to.
    pub region: String,
    /// Muted by a moderator or by themself.
    pub muted: bool,
}

/// Whether a room is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomPhase {
    /// Running.
    Live,
    /// Ended; nobody may join.
    Ended,
}

/// A room's full state: what a client gets on join and what the origin persists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomState {
    /// The room.
    pub room: RoomId,
    /// Live or ended.
    pub phase: RoomPhase,
    /// Everyone present, in join order.
    pub participants: Vec<Participant>,
    /// Raised hands, oldest first.
    pub hands: Vec<ParticipantId>,
    /// Users (token `sub`) banned until the room ends.
    pub banned: Vec<String>,
}

/// How many are in a room, as clients are told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomCounts {
    /// Everyone present.
    pub participants: u32,
    /// Present listeners.
    pub listeners: u32,
}

/// A command to the room authority, on behalf of participant `actor`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RoomCommand {
    /// A participant connects (the edge verified its token).
    Join {
        /// Token `sub`.
        user: String,
        /// Display name.
        name: String,
        /// Role granted by the token.
        role: Role,
        /// Region of the edge.
        region: String,
        /// The role the participant held before its edge lost the origin (re-announce after a
        /// reconnect or an origin restart). Edges are trusted mesh peers (mTLS); the authority keeps
        /// its own record when it has one.
        #[serde(default)]
        resume: Option<RoomRole>,
    },
    /// A participant disconnects.
    Leave,
    /// Raise own hand (listeners).
    RaiseHand,
    /// Lower own hand, or (moderators) someone else's.
    LowerHand {
        /// Whose hand; `None` means own.
        #[serde(default)]
        target: Option<ParticipantId>,
    },
    /// Make `target` a speaker (or a co-host).
    Promote {
        /// Who.
        target: ParticipantId,
        /// Speaker (default) or co-host (hosts only).
        #[serde(default = "default_promote_role")]
        role: RoomRole,
    },
    /// Make `target` a listener again.
    Demote {
        /// Who.
        target: ParticipantId,
    },
    /// Mute `target` (moderators) or oneself.
    Mute {
        /// Who; `None` means self.
        #[serde(default)]
        target: Option<ParticipantId>,
    },
    /// Unmute oneself.
    Unmute,
    /// Remove `target` and ban its user until the room ends.
    Kick {
        /// Who.
        target: ParticipantId,
    },
    /// End the room for everyone (hosts).
    End,
    /// Send a chat message.
    Chat {
        /// Text.
        text: String,
    },
    /// Send a reaction.
    React {
        /// Emoji or short word.
        emoji: String,
    },
    /// Report a user or the room to the room's hosts and the moderators of the application.
    Report {
        /// Who or what.
        target: ReportTarget,
        /// Why.
        reason: ReportReason,
        /// Free text (at most [`MAX_REPORT_TEXT_CHARS`] characters).
        #[serde(default)]
        text: String,
    },
}

fn default_promote_role() -> RoomRole {
    RoomRole::Speaker
}

/// A change of room state, broadcast by the authority to every edge with participants in the room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RoomEvent {
    /// Someone joined.
    ParticipantJoined {
        /// Who.
        participant: Participant,
    },
    /// Someone left (or was kicked).
    ParticipantLeft {
        /// Who.
        id: ParticipantId,
    },
    /// A role changed.
    RoleChanged {
        /// Whose.
        id: ParticipantId,
        /// New role.
        role: RoomRole,
        /// Who changed it.
        by: ParticipantId,
    },
    /// A hand went up.
    HandRaised {
        /// Whose.
        id: ParticipantId,
    },
    /// A hand went down (lowered, or its owner was promoted or left).
    HandLowered {
        /// Whose.
        id: ParticipantId,
    },
    /// A participant was muted.
    Muted {
        /// Who.
        id: ParticipantId,
        /// By whom.
        by: ParticipantId,
    },
    /// A participant unmuted.
    Unmuted {
        /// Who.
        id: ParticipantId,
    },
    /// A chat message.
    Chat {
        /// Sender.
        from: ParticipantId,
        /// Sender's display name.
        name: String,
        /// Text.
        text: String,
        /// Unix milliseconds at the authority.
        at_ms: u64,
    },
    /// A reaction.
    Reaction {
        /// Sender.
        from: ParticipantId,
        /// Emoji or short word.
        emoji: String,
    },
    /// A participant was kicked and banned until the room ends.
    Kicked {
        /// Who.
        id: ParticipantId,
        /// By whom.
        by: ParticipantId,
    },
    /// The room ended.
    Ended {
        /// Who ended it (`None`: ended through the REST API or by an operator).
        by: Option<ParticipantId>,
    },
    /// A participant reported a user or the room. Edges pass it to their hosts and co-hosts
    /// only; it changes no state.
    Reported {
        /// The report.
        report: Report,
    },
}

/// One entry of the active-speaker list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSpeaker {
    /// Who.
    pub id: ParticipantId,
    /// RFC 6464 level, 0 (loudest) to 127 (silent).
    pub level: u8,
}

/// A message from a client over the WebSocket (`/v1/ws?token=...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Enter the room (first message); answered by `snapshot`.
    Join,
    /// An SDP offer for the participant's one PeerConnection (receive slots, plus a send track once
    /// the participant may publish); answered by `answer`.
    Offer {
        /// SDP.
        sdp: String,
    },
    /// Raise own hand.
    RaiseHand,
    /// Lower own hand, or (moderators) someone else's.
    LowerHand {
        /// Whose hand; absent means own.
        #[serde(default)]
        target: Option<ParticipantId>,
    },
    /// Promote a participant.
    Promote {
        /// Who.
        target: ParticipantId,
        /// Speaker (default) or co-host.
        #[serde(default = "default_promote_role")]
        role: RoomRole,
    },
    /// Demote a participant to listener.
    Demote {
        /// Who.
        target: ParticipantId,
    },
    /// Mute someone (moderators) or oneself.
    Mute {
        /// Who; absent means self.
        #[serde(default)]
        target: Option<ParticipantId>,
    },
    /// Unmute oneself.
    Unmute,
    /// Kick and ban someone until the room ends.
    Kick {
        /// Who.
        target: ParticipantId,
    },
    /// End the room.
    End,
    /// Chat.
    Chat {
        /// Text.
        text: String,
    },
    /// React.
    React {
        /// Emoji or short word.
        emoji: String,
    },
    /// Report a user (present, gone or kicked) or the room; the room's hosts get `reported`,
    /// the application a `report_created` webhook. Refused with `error` (`bad_message`,
    /// `not_found`, `invalid`, `rate_limited`).
    Report {
        /// `"room"` or `{"user": "<user id>"}`.
        target: ReportTarget,
        /// One of [`ReportReason::ALL`].
        reason: ReportReason,
        /// Free text (at most [`MAX_REPORT_TEXT_CHARS`] characters).
        #[serde(default)]
        text: String,
    },
    /// Keep-alive; answered by `pong`.
    Ping,
    /// Replace the session's token before it expires (a new token for the same user and room,
    /// with the same role or a lower one); answered by `token_refreshed`, or `error`.
    RefreshToken {
        /// The new token.
        token: String,
    },
    /// One page of the room's participants in id order, starting after `after`; answered by
    /// `participants`.
    ListParticipants {
        /// Last id of the previous page; absent for the first page.
        #[serde(default)]
        after: Option<ParticipantId>,
        /// Page size (at most [`PARTICIPANT_PAGE_MAX`], the default).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// How this listener hears the room now (sent when it starts and after every change). A
    /// `movable` listener on the push or HLS tier is offered a `move` when a better tier has a
    /// seat for it; one who chose its tier itself says `movable: false`.
    Listening {
        /// The tier it plays.
        tier: ListenTier,
        /// Whether the edge may move it to a better tier (default true).
        #[serde(default = "movable_by_default")]
        movable: bool,
    },
}

fn movable_by_default() -> bool {
    true
}

/// How a listener hears a room: the `mode` of a route answer, the `tier` of `listening` and
/// `move`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenTier {
    /// WebRTC at the edge (the best: a fraction of a second, and a raised hand is quick).
    Interactive,
    /// The room's program stream over a WebSocket at the edge.
    Push,
    /// LL-HLS through the CDN.
    Hls,
}

impl ListenTier {
    /// The wire name (`interactive`, `push`, `hls`).
    pub fn as_str(self) -> &'static str {
        match self {
            ListenTier::Interactive => "interactive",
            ListenTier::Push => "push",
            ListenTier::Hls => "hls",
        }
    }
}

/// A message from the edge to a client over the WebSocket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The state, sent once after `join`. In rooms of more than
    /// [`FULL_LIST_MAX_PARTICIPANTS`] (`partial`), `state.participants` holds the hosts,
    /// co-hosts, speakers, raised hands and the receiver only; the listeners are counted in
    /// `counts` and listed on request (`list_participants`).
    Snapshot {
        /// The receiving participant's id.
        you: ParticipantId,
        /// The room.
        state: RoomState,
        /// How many are in the room.
        #[serde(default)]
        counts: RoomCounts,
        /// Listeners were left out of `state.participants`.
        #[serde(default)]
        partial: bool,
    },
    /// New counts of a large room (its listeners' joins and leaves are not sent one by one);
    /// at most about once a second.
    Counts {
        /// How many are in the room.
        counts: RoomCounts,
    },
    /// A participant of a large room the client may not know yet, sent before an event about
    /// it (a raised hand, a role change).
    Participant {
        /// Who.
        participant: Participant,
    },
    /// Answer to `list_participants`.
    Participants {
        /// Participants in id order.
        participants: Vec<Participant>,
        /// Pass as `after` for the next page; absent on the last page.
        next: Option<ParticipantId>,
        /// How many are in the room.
        counts: RoomCounts,
    },
    /// SDP answer to the client's offer.
    Answer {
        /// SDP.
        sdp: String,
    },
    /// The loudest speakers right now (about every 300 ms while anyone speaks).
    ActiveSpeakers {
        /// Loudest first.
        speakers: Vec<ActiveSpeaker>,
    },
    /// A request was refused; nothing changed.
    Error {
        /// Machine-readable code (`forbidden`, `bad_message`, `rate_limited`, `banned`, ...).
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// Answer to `ping`.
    Pong,
    /// Answer to `refresh_token`: the session now lives on the new token.
    TokenRefreshed {
        /// The new token's expiry (Unix seconds).
        exp: u64,
    },
    /// A seat freed on a better tier for this `movable` listener: start playing `tier` beside
    /// the current path, cross over once it plays, close the old path, then say `listening`
    /// (with the old tier to decline).
    Move {
        /// The tier to move to.
        tier: ListenTier,
    },
    /// A room state change.
    #[serde(untagged)]
    Event(RoomEvent),
}

impl ClientMessage {
    /// Parse one WebSocket text message; never panics.
    pub fn parse(text: &str) -> Result<Self, SignalingError> {
        if text.len() > MAX_CLIENT_MESSAGE_BYTES {
            return Err(SignalingError::TooLarge(text.len()));
        }
        serde_json::from_str(text).map_err(|e| SignalingError::Malformed(e.to_string()))
    }
}

/// Why a client message was refused before reaching the room.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalingError {
    /// Over [`MAX_CLIENT_MESSAGE_BYTES`].
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// Not a known message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn role_names_match_the_wire_format() {
        for role in RoomRole::ALL {
            assert_eq!(json!(role), json!(role.as_str()));
        }
    }

    #[test]
    fn client_messages_parse_from_documented_json() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"join"}"#),
            Ok(ClientMessage::Join)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"promote","target":16777217}"#),
            Ok(ClientMessage::Promote {
                target: ParticipantId(16_777_217),
                role: RoomRole::Speaker
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"mute"}"#),
            Ok(ClientMessage::Mute { target: None })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"listening","tier":"push"}"#),
            Ok(ClientMessage::Listening {
                tier: ListenTier::Push,
                movable: true
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"listening","tier":"hls","movable":false}"#),
            Ok(ClientMessage::Listening {
                tier: ListenTier::Hls,
                movable: false
            })
        );
        assert!(ClientMessage::parse(r#"{"type":"listening","tier":"smoke"}"#).is_err());
        assert_eq!(
            serde_json::to_value(ServerMessage::Move {
                tier: ListenTier::Interactive
            })
            .unwrap(),
            json!({"type": "move", "tier": "interactive"})
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"fly"}"#),
            Err(SignalingError::Malformed(_))
        ));
        let big = format!(
            r#"{{"type":"chat","text":"{}"}}"#,
            "a".repeat(MAX_CLIENT_MESSAGE_BYTES)
        );
        assert!(matches!(
            ClientMessage::parse(&big),
            Err(SignalingError::TooLarge(_))
        ));
    }

    #[test]
    fn server_events_are_flat_json() {
        let ev = ServerMessage::Event(RoomEvent::HandRaised {
            id: ParticipantId(7),
        });
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            json!({"type": "hand_raised", "id": 7})
        );
        let back: ServerMessage =
            serde_json::from_value(json!({"type": "hand_raised", "id": 7})).unwrap();
        assert_eq!(back, ev);
        let err = ServerMessage::Error {
            code: "forbidden".into(),
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"type": "error", "code": "forbidden", "message": "no"})
        );
        let ended: ServerMessage =
            serde_json::from_value(json!({"type": "ended", "by": null})).unwrap();
        assert_eq!(ended, ServerMessage::Event(RoomEvent::Ended { by: None }));
    }

    #[test]
    fn reports_parse_from_documented_json() {
        assert_eq!(
            ClientMessage::parse(
                r#"{"type":"report","target":{"user":"u-7"},"reason":"self_harm","text":"x"}"#
            ),
            Ok(ClientMessage::Report {
                target: ReportTarget::User("u-7".into()),
                reason: ReportReason::SelfHarm,
                text: "x".into(),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"report","target":"room","reason":"spam"}"#),
            Ok(ClientMessage::Report {
                target: ReportTarget::Room,
                reason: ReportReason::Spam,
                text: String::new(),
            })
        );
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"report","target":"room","reason":"boring"}"#),
            Err(SignalingError::Malformed(_))
        ));
        for reason in ReportReason::ALL {
            assert_eq!(json!(reason), json!(reason.as_str()));
        }
        let report = Report {
            id: "r1".into(),
            room: RoomId(9),
            reporter: "a".into(),
            reporter_name: "A".into(),
            reporter_id: ParticipantId(3),
            target: ReportTarget::Room,
            target_name: None,
            reason: ReportReason::Other,
            text: String::new(),
            at_ms: 5,
            program_ms: Some(40),
        };
        let ev = ServerMessage::Event(RoomEvent::Reported {
            report: report.clone(),
        });
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["type"], "reported");
        assert_eq!(v["report"]["target"], "room");
        assert_eq!(serde_json::from_value::<ServerMessage>(v).unwrap(), ev);
    }

    #[test]
    fn roles_map_from_tokens() {
        assert_eq!(RoomRole::from_token(Role::Host), RoomRole::Host);
        assert!(RoomRole::Cohost.may_moderate() && !RoomRole::Speaker.may_moderate());
        assert!(!RoomRole::Listener.may_publish());
    }
}
