//! Sans-IO room replica and the edge's fail-fast checks.
//!
//! The origin's `Room` authority owns every room's state. An edge keeps a [`RoomReplica`] per room it
//! has participants in, built from the authority's `RoomSnapshot` and kept current by applying its
//! `RoomEvents` in order. Applying is idempotent (a snapshot may already include an event that
//! arrives after it), so snapshot/event interleavings converge.
//!
//! [`precheck`] refuses commands the authority would refuse anyway (permissions, unknown targets,
//! oversized chat) so a client gets its error at once and the origin sees less junk;
//! [`WindowLimiter`] and [`FloodGuard`] rate-limit chat/reactions and raw WebSocket messages.

use amphi_protocol::room::{
    Participant, RoomCommand, RoomCounts, RoomEvent, RoomPhase, RoomRole, RoomState,
    FULL_LIST_MAX_PARTICIPANTS, MAX_CHAT_CHARS, MAX_REACTION_CHARS, MAX_REPORT_TEXT_CHARS,
    PARTICIPANT_PAGE_MAX,
};
use amphi_protocol::ParticipantId;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A refusal: machine code and message, as sent in a `ServerMessage::Error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Machine-readable code (`forbidden`, `not_found`, `bad_message`, `rate_limited`, ...).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// What a joining client is sent: the state (without the listeners in a large room) and the
/// counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientView {
    /// The state; `participants` trimmed when `partial`.
    pub state: RoomState,
    /// How many are in the room.
    pub counts: RoomCounts,
    /// Listeners were left out.
    pub partial: bool,
}

/// An edge's copy of one room's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomReplica {
    state: RoomState,
}

impl RoomReplica {
    /// A replica from the authority's snapshot.
    pub fn from_snapshot(state: RoomState) -> Self {
        RoomReplica { state }
    }

    /// The current state.
    pub fn state(&self) -> &RoomState {
        &self.state
    }

    /// One participant.
    pub fn participant(&self, id: ParticipantId) -> Option<&Participant> {
        self.state.participants.iter().find(|p| p.id == id)
    }

    /// A participant by user identity (token `sub`), the most recent one if several.
    pub fn by_user(&self, user: &str) -> Option<&Participant> {
        self.state
            .participants
            .iter()
            .rev()
            .find(|p| p.user == user)
    }

    /// Whether `id` may send audio right now (a publishing role and not muted).
    pub fn may_send(&self, id: ParticipantId) -> bool {
        self.participant(id)
            .is_some_and(|p| p.role.may_publish() && !p.muted)
    }

    /// How many are in the room.
    pub fn counts(&self) -> RoomCounts {
        let listeners = self
            .state
            .participants
            .iter()
            .filter(|p| p.role == RoomRole::Listener)
            .count();
        RoomCounts {
            participants: u32::try_from(self.state.participants.len()).unwrap_or(u32::MAX),
            listeners: u32::try_from(listeners).unwrap_or(u32::MAX),
        }
    }

    /// Whether the room is past [`FULL_LIST_MAX_PARTICIPANTS`]: clients get its listeners on
    /// request and their number in counts.
    pub fn is_large(&self) -> bool {
        self.state.participants.len() > FULL_LIST_MAX_PARTICIPANTS
    }

    /// What participant `you` is sent on joining: everything in a small room; in a large one
    /// the hosts, co-hosts, speakers, raised hands and `you` (its size does not grow with the
    /// listeners).
    pub fn client_view(&self, you: ParticipantId) -> ClientView {
        let counts = self.counts();
        if !self.is_large() {
            return ClientView {
                state: self.state.clone(),
                counts,
                partial: false,
            };
        }
        let st = &self.state;
        let participants = st
            .participants
            .iter()
            .filter(|p| p.role != RoomRole::Listener || p.id == you || st.hands.contains(&p.id))
            .cloned()
            .collect();
        ClientView {
            state: RoomState {
                room: st.room,
                phase: st.phase,
                participants,
                hands: st.hands.clone(),
                banned: st.banned.clone(),
            },
            counts,
            partial: true,
        }
    }

    /// One page of participants in id order after `after` (at most `limit`, capped at
    /// [`PARTICIPANT_PAGE_MAX`]), and the `after` of the next page if there is one.
    pub fn page(
        &self,
        after: Option<ParticipantId>,
        limit: Option<u32>,
    ) -> (Vec<Participant>, Option<ParticipantId>) {
        let limit = limit
            .map_or(PARTICIPANT_PAGE_MAX, |l| l as usize)
            .clamp(1, PARTICIPANT_PAGE_MAX);
        let mut rest: Vec<&Participant> = self
            .state
            .participants
            .iter()
            .filter(|p| after.is_none_or(|a| p.id > a))
            .collect();
        rest.sort_unstable_by_key(|p| p.id);
        let more = rest.len() > limit;
        let page: Vec<Participant> = rest.into_iter().take(limit).cloned().collect();
        let next = if more {
            page.last().map(|p| p.id)
        } else {
            None
        };
        (page, next)
    }

    /// Whether the room has ended.
    pub fn ended(&self) -> bool {
        self.state.phase == RoomPhase::Ended
    }

    /// Apply one authority event. Idempotent: re-applying an event already reflected changes
    /// nothing.
    pub fn apply(&mut self, ev: &RoomEvent) {
        let st = &mut self.state;
        match ev {
            RoomEvent::ParticipantJoined { participant } => {
                match st.participants.iter_mut().find(|p| p.id == participant.id) {
                    Some(p) => *p = participant.clone(),
                    None => st.participants.push(participant.clone()),
                }
            }
            RoomEvent::ParticipantLeft { id } => {
                st.participants.retain(|p| p.id != *id);
                st.hands.retain(|h| h != id);
            }
            RoomEvent::RoleChanged { id, role, .. } => {
                if let Some(p) = st.participants.iter_mut().find(|p| p.id == *id) {
                    p.role = *role;
                }
                if role.may_publish() {
                    st.hands.retain(|h| h != id);
                }
            }
            RoomEvent::HandRaised { id } => {
                if !st.hands.contains(id) {
                    st.hands.push(*id);
                }
            }
            RoomEvent::HandLowered { id } => st.hands.retain(|h| h != id),
            RoomEvent::Muted { id, .. } => {
                if let Some(p) = st.participants.iter_mut().find(|p| p.id == *id) {
                    p.muted = true;
                }
            }
            RoomEvent::Unmuted { id } => {
                if let Some(p) = st.participants.iter_mut().find(|p| p.id == *id) {
                    p.muted = false;
                }
            }
            RoomEvent::Kicked { id, .. } => {
                if let Some(pos) = st.participants.iter().position(|p| p.id == *id) {
                    let p = st.participants.remove(pos);
                    if !st.banned.contains(&p.user) {
                        st.banned.push(p.user);
                    }
                }
                st.hands.retain(|h| h != id);
            }
            RoomEvent::Ended { .. } => st.phase = RoomPhase::Ended,
            RoomEvent::Chat { .. } | RoomEvent::Reaction { .. } | RoomEvent::Reported { .. } => {}
        }
    }
}

fn forbidden(msg: &str) -> Refusal {
    Refusal::new("forbidden", msg)
}

/// Check `command` by `actor` against the replica's view, the way the authority will.
///
/// Only clear-cut refusals are made here (permissions, unknown target, bad text); anything the
/// replica cannot judge is left to the authority.
pub fn precheck(
    replica: &RoomReplica,
    actor: ParticipantId,
    command: &RoomCommand,
) -> Result<(), Refusal> {
    if replica.ended() {
        return Err(Refusal::new("room_ended", "the room has ended"));
    }
    let Some(me) = replica.participant(actor) else {
        return Err(Refusal::new(
            "not_joined",
            "you are not a participant of this room",
        ));
    };
    let target = |t: ParticipantId| {
        replica
            .participant(t)
            .ok_or_else(|| Refusal::new("not_found", format!("no participant {t} in this room")))
    };
    // A co-host may act on speakers and listeners, never on hosts or other co-hosts.
    let may_act_on = |other: &Participant| match me.role {
        RoomRole::Host => true,
        RoomRole::Cohost => matches!(other.role, RoomRole::Speaker | RoomRole::Listener),
        _ => false,
    };
    match command {
        RoomCommand::Join { .. } | RoomCommand::Leave => Ok(()),
        RoomCommand::RaiseHand => {
            if me.role == RoomRole::Listener {
                Ok(())
            } else {
                Err(forbidden("only listeners raise their hand"))
            }
        }
        RoomCommand::LowerHand { target: None } => Ok(()),
        RoomCommand::LowerHand { target: Some(t) } if *t == actor => Ok(()),
        RoomCommand::LowerHand { target: Some(t) } => {
            let other = target(*t)?;
            if me.role.may_moderate() && may_act_on(other) {
                Ok(())
            } else {
                Err(forbidden("only moderators lower other hands"))
            }
        }
        RoomCommand::Promote { target: t, role } => {
            if !me.role.may_moderate() {
                return Err(forbidden("only hosts and co-hosts promote"));
            }
            let other = target(*t)?;
            match role {
                RoomRole::Speaker => {}
                RoomRole::Cohost if me.role == RoomRole::Host => {}
                RoomRole::Cohost => return Err(forbidden("only hosts name co-hosts")),
                RoomRole::Host | RoomRole::Listener => {
                    return Err(Refusal::new(
                        "bad_message",
                        "promote to speaker or cohost only",
                    ))
                }
            }
            if !may_act_on(other) {
                return Err(forbidden("you may not change this participant's role"));
            }
            Ok(())
        }
        RoomCommand::Demote { target: t } | RoomCommand::Kick { target: t } => {
            if !me.role.may_moderate() {
                return Err(forbidden("only hosts and co-hosts moderate"));
            }
            let other = target(*t)?;
            if *t == actor || !may_act_on(other) {
                return Err(forbidden("you may not moderate this participant"));
            }
            Ok(())
        }
        RoomCommand::Mute { target: None } => Ok(()),
        RoomCommand::Mute { target: Some(t) } if *t == actor => Ok(()),
        RoomCommand::Mute { target: Some(t) } => {
            if !me.role.may_moderate() {
                return Err(forbidden("only hosts and co-hosts mute others"));
            }
            let other = target(*t)?;
            if !may_act_on(other) {
                return Err(forbidden("you may not mute this participant"));
            }
            Ok(())
        }
        RoomCommand::Unmute => {
            if me.role.may_publish() {
                Ok(())
            } else {
                Err(forbidden("listeners have no microphone to unmute"))
            }
        }
        RoomCommand::End => {
            if me.role == RoomRole::Host {
                Ok(())
            } else {
                Err(forbidden("only hosts end the room"))
            }
        }
        // Anyone present may report; who may be reported and how often is the authority's.
        RoomCommand::Report { text, .. } => {
            if text.trim().chars().count() > MAX_REPORT_TEXT_CHARS {
                Err(Refusal::new(
                    "bad_message",
                    format!("report text must be at most {MAX_REPORT_TEXT_CHARS} characters"),
                ))
            } else {
                Ok(())
            }
        }
        RoomCommand::Chat { text } => {
            let n = text.chars().count();
            if text.trim().is_empty() || n > MAX_CHAT_CHARS {
                Err(Refusal::new(
                    "bad_message",
                    format!("chat text must be 1 to {MAX_CHAT_CHARS} characters"),
                ))
            } else {
                Ok(())
            }
        }
        RoomCommand::React { emoji } => {
            let n = emoji.chars().count();
            if emoji.trim().is_empty() || n > MAX_REACTION_CHARS {
                Err(Refusal::new(
                    "bad_message",
                    format!("a reaction is 1 to {MAX_REACTION_CHARS} characters"),
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// At most `limit` events in any sliding `window`.
#[derive(Clone, Debug)]
pub struct WindowLimiter {
    limit: usize,
    window: Duration,
    times: VecDeque<Instant>,
}

impl WindowLimiter {
    /// Chat: 5 messages per 10 s.
    pub fn chat() -> Self {
        WindowLimiter::new(5, Duration::from_secs(10))
    }

    /// Reactions: 10 per 10 s.
    pub fn reactions() -> Self {
        WindowLimiter::new(10, Duration::from_secs(10))
    }

    /// `limit` per `window`.
    pub fn new(limit: usize, window: Duration) -> Self {
        WindowLimiter {
            limit,
            window,
            times: VecDeque::with_capacity(limit),
        }
    }

    /// Record an attempt at `now`; false (and nothing recorded) if over the limit.
    pub fn allow(&mut self, now: Instant) -> bool {
        while let Some(&t) = self.times.front() {
            if now.saturating_duration_since(t) >= self.window {
                self.times.pop_front();
            } else {
                break;
            }
        }
        if self.times.len() >= self.limit {
            return false;
        }
        self.times.push_back(now);
        true
    }
}

/// What to do with one raw WebSocket message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodVerdict {
    /// Handle it.
    Accept,
    /// Refuse it with `rate_limited`.
    Refuse,
    /// The client floods: close the connection.
    Close,
}

/// Token bucket over raw client messages: [`FloodGuard::RATE`] per second with a burst of
/// [`FloodGuard::BURST`]; more than [`FloodGuard::MAX_REFUSED`] refusals close the connection.
#[derive(Clone, Debug)]
pub struct FloodGuard {
    tokens: f64,
    last: Instant,
    refused: u32,
}

impl FloodGuard {
    /// Sustained messages per second.
    pub const RATE: f64 = 20.0;
    /// Burst size.
    pub const BURST: f64 = 40.0;
    /// Refused messages (net of accepted ones) after which the client is disconnected.
    pub const MAX_REFUSED: u32 = 100;

    /// A full bucket at `now`.
    pub fn new(now: Instant) -> Self {
        FloodGuard {
            tokens: Self::BURST,
            last: now,
            refused: 0,
        }
    }

    /// One message arrived at `now`.
    pub fn check(&mut self, now: Instant) -> FloodVerdict {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * Self::RATE).min(Self::BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = self.refused.saturating_sub(1);
            FloodVerdict::Accept
        } else {
            self.refused += 1;
            if self.refused > Self::MAX_REFUSED {
                FloodVerdict::Close
            } else {
                FloodVerdict::Refuse
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_protocol::RoomId;

    fn p(id: u32, role: RoomRole) -> Participant {
        Participant {
            id: ParticipantId(id),
            user: format!("u{id}"),
            name: format!("n{id}"),
            role,
            region: "us-east".into(),
            muted: false,
        }
    }

    fn replica() -> RoomReplica {
        RoomReplica::from_snapshot(RoomState {
            room: RoomId(1),
            phase: RoomPhase::Live,
            participants: vec![
                p(1, RoomRole::Host),
                p(2, RoomRole::Cohost),
                p(3, RoomRole::Speaker),
                p(4, RoomRole::Listener),
                p(5, RoomRole::Listener),
            ],
            hands: vec![],
            banned: vec![],
        })
    }

    #[test]
    fn events_apply_idempotently() {
        let mut r = replica();
        let joined = RoomEvent::ParticipantJoined {
            participant: p(6, RoomRole::Listener),
        };
        r.apply(&joined);
        r.apply(&joined);
        assert_eq!(r.state().participants.len(), 6);
        r.apply(&RoomEvent::HandRaised {
            id: ParticipantId(6),
        });
        r.apply(&RoomEvent::HandRaised {
            id: ParticipantId(4),
        });
        r.apply(&RoomEvent::HandRaised {
            id: ParticipantId(6),
        });
        assert_eq!(r.state().hands, vec![ParticipantId(6), ParticipantId(4)]);
        r.apply(&RoomEvent::RoleChanged {
            id: ParticipantId(6),
            role: RoomRole::Speaker,
            by: ParticipantId(1),
        });
        assert_eq!(r.state().hands, vec![ParticipantId(4)]);
        assert!(r.may_send(ParticipantId(6)));
        r.apply(&RoomEvent::Muted {
            id: ParticipantId(6),
            by: ParticipantId(1),
        });
        assert!(!r.may_send(ParticipantId(6)));
        r.apply(&RoomEvent::Unmuted {
            id: ParticipantId(6),
        });
        assert!(r.may_send(ParticipantId(6)));
        let kicked = RoomEvent::Kicked {
            id: ParticipantId(6),
            by: ParticipantId(1),
        };
        r.apply(&kicked);
        r.apply(&kicked);
        assert!(r.participant(ParticipantId(6)).is_none());
        assert_eq!(r.state().banned, vec!["u6".to_string()]);
        r.apply(&RoomEvent::ParticipantLeft {
            id: ParticipantId(4),
        });
        assert!(r.state().hands.is_empty());
        assert!(!r.ended());
        r.apply(&RoomEvent::Ended { by: None });
        assert!(r.ended());
        assert_eq!(
            precheck(&r, ParticipantId(1), &RoomCommand::RaiseHand)
                .unwrap_err()
                .code,
            "room_ended"
        );
    }

    #[test]
    fn permission_table() {
        let r = replica();
        let id = ParticipantId;
        let ok = |a: u32, c: RoomCommand| precheck(&r, id(a), &c).is_ok();
        // Moderation by role: host, cohost, speaker, listener acting on a listener.
        for (actor, allowed) in [(1, true), (2, true), (3, false), (4, false)] {
            for c in [
                RoomCommand::Promote {
                    target: id(5),
                    role: RoomRole::Speaker,
                },
                RoomCommand::Demote { target: id(5) },
                RoomCommand::Mute {
                    target: Some(id(5)),
                },
                RoomCommand::Kick { target: id(5) },
                RoomCommand::LowerHand {
                    target: Some(id(5)),
                },
            ] {
                assert_eq!(ok(actor, c.clone()), allowed, "actor {actor} {c:?}");
            }
        }
        // Co-hosts never act on hosts or co-hosts, and do not name co-hosts or end.
        assert!(!ok(2, RoomCommand::Kick { target: id(1) }));
        assert!(!ok(
            2,
            RoomCommand::Mute {
                target: Some(id(1))
            }
        ));
        assert!(!ok(
            2,
            RoomCommand::Promote {
                target: id(5),
                role: RoomRole::Cohost
            }
        ));
        assert!(ok(
            1,
            RoomCommand::Promote {
                target: id(5),
                role: RoomRole::Cohost
            }
        ));
        assert!(!ok(
            1,
            RoomCommand::Promote {
                target: id(5),
                role: RoomRole::Host
            }
        ));
        assert!(!ok(2, RoomCommand::End));
        assert!(!ok(3, RoomCommand::End));
        assert!(ok(1, RoomCommand::End));
        assert!(!ok(1, RoomCommand::Kick { target: id(1) }), "no self-kick");
        // Self actions.
        assert!(ok(4, RoomCommand::RaiseHand));
        assert!(!ok(3, RoomCommand::RaiseHand));
        assert!(ok(4, RoomCommand::LowerHand { target: None }));
        assert!(ok(3, RoomCommand::Mute { target: None }));
        assert!(ok(3, RoomCommand::Unmute));
        assert!(!ok(4, RoomCommand::Unmute));
        // Unknown targets and actors.
        let e = precheck(&r, id(1), &RoomCommand::Kick { target: id(99) }).unwrap_err();
        assert_eq!(e.code, "not_found");
        let e = precheck(&r, id(99), &RoomCommand::RaiseHand).unwrap_err();
        assert_eq!(e.code, "not_joined");
        // Chat and reactions: everyone, bounded text.
        assert!(ok(4, RoomCommand::Chat { text: "hi".into() }));
        assert!(!ok(4, RoomCommand::Chat { text: "  ".into() }));
        assert!(!ok(
            4,
            RoomCommand::Chat {
                text: "x".repeat(MAX_CHAT_CHARS + 1)
            }
        ));
        assert!(ok(
            5,
            RoomCommand::React {
                emoji: "👏".into()
            }
        ));
        assert!(!ok(
            5,
            RoomCommand::React {
                emoji: "x".repeat(MAX_REACTION_CHARS + 1)
            }
        ));
    }

    #[test]
    fn window_limiter_slides() {
        let t0 = Instant::now();
        let mut l = WindowLimiter::chat();
        for i in 0..5 {
            assert!(l.allow(t0 + Duration::from_millis(i)));
        }
        assert!(!l.allow(t0 + Duration::from_secs(9)));
        assert!(l.allow(t0 + Duration::from_secs(10)));
        assert!(!l.allow(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn flood_guard_refuses_then_closes() {
        let t0 = Instant::now();
        let mut g = FloodGuard::new(t0);
        for _ in 0..40 {
            assert_eq!(g.check(t0), FloodVerdict::Accept);
        }
        assert_eq!(g.check(t0), FloodVerdict::Refuse);
        // Refill: 20 per second.
        assert_eq!(
            g.check(t0 + Duration::from_millis(100)),
            FloodVerdict::Accept
        );
        let mut last = FloodVerdict::Accept;
        for _ in 0..200 {
            last = g.check(t0 + Duration::from_millis(100));
            if last == FloodVerdict::Close {
                break;
            }
        }
        assert_eq!(last, FloodVerdict::Close);
    }
}
