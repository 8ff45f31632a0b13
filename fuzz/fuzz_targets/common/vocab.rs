//! A small generated vocabulary of room messages shared by the signaling and room authority
//! targets: few participant ids, users and rooms, so that generated sequences hit the same
//! participants again (joins, then moderation of those who joined), plus hostile strings.
#![allow(dead_code)] // each target uses part of it

use amphi_protocol::room::{
    Participant, Report, ReportReason, ReportTarget, RoomCommand, RoomEvent, RoomPhase, RoomRole,
    RoomState,
};
use amphi_protocol::token::Role;
use amphi_protocol::{ParticipantId, RoomId};
use arbitrary::Arbitrary;

/// Participant ids 1..=8.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Pid(pub u8);

impl Pid {
    pub fn id(self) -> ParticipantId {
        ParticipantId(u32::from(self.0 % 8) + 1)
    }
}

/// Rooms 1..=3.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Rid(pub u8);

impl Rid {
    pub fn id(self) -> RoomId {
        RoomId(u64::from(self.0 % 3) + 1)
    }
}

const USERS: [&str; 6] = ["ann", "bob", "cy", "dee", "", "e\u{0}vil"];
const TEXTS: [&str; 6] = ["hi", "", "  \u{7} ", "👏", "a\nb", "\u{202e}x"];

/// A user name (including an empty one and one with a control character).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct User(pub u8);

impl User {
    pub fn name(self) -> String {
        USERS[usize::from(self.0) % USERS.len()].to_string()
    }
}

/// A text: one of a few tricky strings repeated (up to far beyond every limit).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Text {
    pub which: u8,
    pub times: u8,
}

impl Text {
    pub fn text(self) -> String {
        TEXTS[usize::from(self.which) % TEXTS.len()].repeat(usize::from(self.times) * 3)
    }
}

#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum ARole {
    Host,
    Cohost,
    Speaker,
    Listener,
}

impl ARole {
    pub fn role(self) -> RoomRole {
        match self {
            ARole::Host => RoomRole::Host,
            ARole::Cohost => RoomRole::Cohost,
            ARole::Speaker => RoomRole::Speaker,
            ARole::Listener => RoomRole::Listener,
        }
    }
}

#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum AToken {
    Host,
    Speaker,
    Listener,
}

impl AToken {
    pub fn role(self) -> Role {
        match self {
            AToken::Host => Role::Host,
            AToken::Speaker => Role::Speaker,
            AToken::Listener => Role::Listener,
        }
    }
}

/// Every [`RoomCommand`].
#[derive(Arbitrary, Clone, Debug)]
pub enum Cmd {
    Join {
        user: User,
        name: Text,
        role: AToken,
        region: Text,
        resume: Option<ARole>,
    },
    Leave,
    RaiseHand,
    LowerHand(Option<Pid>),
    Promote(Pid, ARole),
    Demote(Pid),
    Mute(Option<Pid>),
    Unmute,
    Kick(Pid),
    End,
    Chat(Text),
    React(Text),
    /// A report of a user (`Some`) or the room (`None`), with a reason and free text.
    Report(Option<User>, u8, Text),
}

/// The report reason numbered `n` (wrapping over every reason).
pub fn reason(n: u8) -> ReportReason {
    ReportReason::ALL[usize::from(n) % ReportReason::ALL.len()]
}

/// What a report is about: a user (`Some`) or the room.
pub fn report_target(user: Option<User>) -> ReportTarget {
    user.map_or(ReportTarget::Room, |u| ReportTarget::User(u.name()))
}

impl Cmd {
    pub fn command(&self) -> RoomCommand {
        match self.clone() {
            Cmd::Join {
                user,
                name,
                role,
                region,
                resume,
            } => RoomCommand::Join {
                user: user.name(),
                name: name.text(),
                role: role.role(),
                region: region.text(),
                resume: resume.map(ARole::role),
            },
            Cmd::Leave => RoomCommand::Leave,
            Cmd::RaiseHand => RoomCommand::RaiseHand,
            Cmd::LowerHand(t) => RoomCommand::LowerHand {
                target: t.map(Pid::id),
            },
            Cmd::Promote(t, r) => RoomCommand::Promote {
                target: t.id(),
                role: r.role(),
            },
            Cmd::Demote(t) => RoomCommand::Demote { target: t.id() },
            Cmd::Mute(t) => RoomCommand::Mute {
                target: t.map(Pid::id),
            },
            Cmd::Unmute => RoomCommand::Unmute,
            Cmd::Kick(t) => RoomCommand::Kick { target: t.id() },
            Cmd::End => RoomCommand::End,
            Cmd::Chat(t) => RoomCommand::Chat { text: t.text() },
            Cmd::React(t) => RoomCommand::React { emoji: t.text() },
            Cmd::Report(target, r, text) => RoomCommand::Report {
                target: report_target(target),
                reason: reason(r),
                text: text.text(),
            },
        }
    }
}

/// A participant record as an origin (or a stored room) may describe it.
#[derive(Arbitrary, Clone, Debug)]
pub struct APart {
    pub id: Pid,
    pub user: User,
    pub name: Text,
    pub role: ARole,
    pub region: Text,
    pub muted: bool,
}

impl APart {
    pub fn participant(&self) -> Participant {
        Participant {
            id: self.id.id(),
            user: self.user.name(),
            name: self.name.text(),
            role: self.role.role(),
            region: self.region.text(),
            muted: self.muted,
        }
    }
}

/// A room state, consistent or not (duplicate ids, hands of strangers, banned participants).
#[derive(Arbitrary, Clone, Debug)]
pub struct AState {
    pub room: Rid,
    pub ended: bool,
    pub participants: Vec<APart>,
    pub hands: Vec<Pid>,
    pub banned: Vec<User>,
}

impl AState {
    pub fn state(&self) -> RoomState {
        RoomState {
            room: self.room.id(),
            phase: if self.ended {
                RoomPhase::Ended
            } else {
                RoomPhase::Live
            },
            participants: self.participants.iter().map(APart::participant).collect(),
            hands: self.hands.iter().map(|h| h.id()).collect(),
            banned: self.banned.iter().map(|u| u.name()).collect(),
        }
    }
}

/// Every [`RoomEvent`].
#[derive(Arbitrary, Clone, Debug)]
pub enum Ev {
    Joined(APart),
    Left(Pid),
    RoleChanged(Pid, ARole, Pid),
    HandRaised(Pid),
    HandLowered(Pid),
    Muted(Pid, Pid),
    Unmuted(Pid),
    Chat(Pid, Text, Text, u64),
    Reaction(Pid, Text),
    Kicked(Pid, Pid),
    Ended(Option<Pid>),
    /// A report by a participant about a user or the room.
    Reported(Pid, Option<User>, u8, Text, Option<u64>),
}

impl Ev {
    pub fn event(&self) -> RoomEvent {
        match self.clone() {
            Ev::Joined(p) => RoomEvent::ParticipantJoined {
                participant: p.participant(),
            },
            Ev::Left(id) => RoomEvent::ParticipantLeft { id: id.id() },
            Ev::RoleChanged(id, role, by) => RoomEvent::RoleChanged {
                id: id.id(),
                role: role.role(),
                by: by.id(),
            },
            Ev::HandRaised(id) => RoomEvent::HandRaised { id: id.id() },
            Ev::HandLowered(id) => RoomEvent::HandLowered { id: id.id() },
            Ev::Muted(id, by) => RoomEvent::Muted {
                id: id.id(),
                by: by.id(),
            },
            Ev::Unmuted(id) => RoomEvent::Unmuted { id: id.id() },
            Ev::Chat(from, name, text, at_ms) => RoomEvent::Chat {
                from: from.id(),
                name: name.text(),
                text: text.text(),
                at_ms,
            },
            Ev::Reaction(from, emoji) => RoomEvent::Reaction {
                from: from.id(),
                emoji: emoji.text(),
            },
            Ev::Kicked(id, by) => RoomEvent::Kicked {
                id: id.id(),
                by: by.id(),
            },
            Ev::Ended(by) => RoomEvent::Ended {
                by: by.map(Pid::id),
            },
            Ev::Reported(from, target, r, text, program_ms) => RoomEvent::Reported {
                report: Report {
                    id: "r".into(),
                    room: RoomId(1),
                    reporter: "u".into(),
                    reporter_name: "n".into(),
                    reporter_id: from.id(),
                    target: report_target(target),
                    target_name: None,
                    reason: reason(r),
                    text: text.text(),
                    at_ms: 0,
                    program_ms,
                },
            },
        }
    }
}
