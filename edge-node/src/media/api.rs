//! Messages between the media shards and the rest of the edge (HTTP/WebSocket admission,
//! signaling, the uplink). A leaf: it names no other edge module but the sans-IO ones its types
//! carry, so the HTTP, WebSocket and signaling layers depend on it and not on the media driver.

use crate::peers::InsertError;
use crate::sdpfrag::IceFragment;
use crate::signaling::SessionKind;
use amphi_protocol::room::ActiveSpeaker;
use amphi_protocol::token::Claims;
use amphi_protocol::{ParticipantId, RoomId};
use str0m::change::SdpOffer;
use str0m::media::Mid;
use str0m::Rtc;
use tokio::sync::oneshot;

/// A negotiated peer handed from the HTTP layer to the driver.
pub(crate) struct NewPeer {
    /// Session id (WHIP/WHEP: the last segment of `Location`).
    pub session: String,
    /// Local ICE ufrag given in the answer.
    pub ufrag: String,
    /// The str0m instance, offer accepted, local candidate added.
    pub rtc: Rtc,
    /// Room joined.
    pub room: RoomId,
    /// Media id.
    pub participant: ParticipantId,
    /// Display name from the token.
    pub name: String,
    /// `jti` of the token that created the session (DELETE must present the same token).
    pub jti: String,
    /// What kind of session owns the PeerConnection.
    pub kind: SessionKind,
    /// Whether the offer sends audio (a publisher).
    pub publishing: bool,
    /// Whether its audio may be forwarded now (publishing role, not muted).
    pub may_send: bool,
    /// Mids of the receive slots (the client's recvonly audio m-lines), at most
    /// [`amphi_protocol::room::LISTENER_AUDIO_SLOTS`].
    pub slots: Vec<Mid>,
    /// The accepted offer, kept to answer an ICE restart sent as a WHIP/WHEP `PATCH` fragment.
    pub offer_sdp: String,
}

/// Result of a DELETE.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RemoveOutcome {
    /// Torn down.
    Removed,
    /// No such session in that room.
    NotFound,
    /// The session exists but belongs to another token.
    Forbidden,
}

/// Result of a `PATCH`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PatchOutcome {
    /// Candidates accepted (an ICE-lite edge learns client addresses from its checks): 204.
    Trickled,
    /// ICE restarted: 200 with this answer fragment and the new ETag (the new local ufrag).
    Restarted { fragment: String, etag: String },
    /// No `If-Match`: 428.
    PreconditionRequired,
    /// `If-Match` names another ETag: 412.
    PreconditionFailed,
    /// The restart offer was refused: 400 with this message.
    Refused(String),
    /// No such session in that room.
    NotFound,
    /// The session belongs to another token.
    Forbidden,
    /// The request's token is not the session's: signaling must first move the participant's
    /// session to it ([`crate::sessions::Sessions::refresh`]), then the `PATCH` is sent again
    /// with `refreshed` set.
    RefreshNeeded { participant: ParticipantId },
}

/// Requests to a media shard.
pub(crate) enum MediaCommand {
    /// Start serving a peer.
    Add {
        peer: Box<NewPeer>,
        reply: oneshot::Sender<Result<(), InsertError>>,
    },
    /// Tear a session down (WHIP/WHEP DELETE).
    Remove {
        session: String,
        room: RoomId,
        jti: String,
        reply: oneshot::Sender<RemoveOutcome>,
    },
    /// A new offer on an existing PeerConnection (promotion, demotion, ICE restart).
    Renegotiate {
        participant: ParticipantId,
        offer: Box<SdpOffer>,
        publishing: bool,
        slots: Vec<Mid>,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Whether the participant already has a PeerConnection here.
    HasPeer {
        participant: ParticipantId,
        reply: oneshot::Sender<bool>,
    },
    /// A WHIP/WHEP `PATCH` (RFC 9725 §4.4): trickled candidates or an ICE restart; with a new
    /// token of the session's user, also a token refresh.
    Patch {
        session: String,
        room: RoomId,
        /// The verified bearer token of the request.
        claims: Box<Claims>,
        /// Whether signaling already moved the session to `claims` (after
        /// [`PatchOutcome::RefreshNeeded`]).
        refreshed: bool,
        /// The `If-Match` header, if any.
        if_match: Option<String>,
        fragment: IceFragment,
        reply: oneshot::Sender<PatchOutcome>,
    },
    /// The participant has a newer PeerConnection on another shard: drop the one here, keeping
    /// the participant.
    Supersede { participant: ParticipantId },
    /// The participant's WebSocket closed: drop its PeerConnection.
    RemoveParticipant { participant: ParticipantId },
    /// The origin says the room ended: drop its peers.
    EndRoom { room: RoomId },
}

/// From signaling to the media shards (every shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MediaControl {
    /// Whether the participant's audio may be forwarded.
    Permission {
        participant: ParticipantId,
        may_send: bool,
    },
    /// Tear down the participant's PeerConnection.
    Close { participant: ParticipantId },
}

/// From the media shards to signaling (the event channel that replaces a shared lock).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MediaEvent {
    /// The room's active speakers on this shard (sent every
    /// [`crate::media::core::ACTIVE_SPEAKERS_INTERVAL`] while not empty, and once when it empties).
    ActiveSpeakers {
        room: RoomId,
        speakers: Vec<ActiveSpeaker>,
    },
    /// A WHIP/WHEP session's PeerConnection is gone: the participant leaves.
    PeerGone { participant: ParticipantId },
}
