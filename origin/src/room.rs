//! The room authority (sans-IO): one [`Room`] per room this origin owns, fed [`RoomCommand`]s on
//! behalf of participants with an explicit `now`, answering with the [`RoomEvent`]s every replica
//! applies, or a [`Rejection`] that changed nothing. [`Rooms`] holds every room of the origin.
//!
//! The permission table, the codes and the limits are documented in `docs/signaling.md`; the
//! unit tests below check the whole command x role table.

use amphi_protocol::room::{
    Participant, Report, ReportReason, ReportTarget, RoomCommand, RoomEvent, RoomPhase, RoomRole,
    RoomState, MAX_CHAT_CHARS, MAX_REACTION_CHARS, MAX_REPORT_TEXT_CHARS,
};
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

/// Longest user identity (token `sub`) accepted on join, in bytes.
pub const MAX_USER_BYTES: usize = 256;
/// Display names are cut to this many characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest region name accepted on join, in bytes.
pub const MAX_REGION_BYTES: usize = 64;

/// Machine-readable reason of a [`Rejection`] (the `code` of `CommandRejected` and of the
/// client's `error` event).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The actor's role does not allow the command (or the target is protected).
    Forbidden,
    /// The actor or the target is not in the room, or the room is unknown.
    NotFound,
    /// A field is invalid (empty or too long text, a role that cannot be granted).
    BadMessage,
    /// Well formed but meaningless here (kicking oneself, a participant id owned by another user).
    Invalid,
    /// The user was kicked and is banned until the room ends.
    Banned,
    /// The room has ended; it accepts nothing.
    RoomEnded,
    /// Too many chat messages, reactions or reports in the window.
    RateLimited,
    /// A capacity limit (participants in a room, rooms on this origin).
    Limit,
}

impl RejectCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Forbidden => "forbidden",
            RejectCode::NotFound => "not_found",
            RejectCode::BadMessage => "bad_message",
            RejectCode::Invalid => "invalid",
            RejectCode::Banned => "banned",
            RejectCode::RoomEnded => "room_ended",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::Limit => "limit",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused command: nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Why, for machines.
    pub code: RejectCode,
    /// Why, for people.
    pub message: String,
}

fn reject<T>(code: RejectCode, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection {
        code,
        message: message.into(),
    })
}

/// A sliding-window rate: at most `max` actions in any `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Actions allowed in one window.
    pub max: usize,
    /// The window.
    pub window: Duration,
}

/// Limits of one room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomLimits {
    /// Chat messages per participant.
    pub chat: Rate,
    /// Reactions per participant.
    pub reactions: Rate,
    /// Reports per user (every session of the user together).
    pub reports: Rate,
    /// Participants present at most at once.
    pub max_participants: usize,
    /// Participants one user (token `sub`) may be at once, over every edge.
    pub max_sessions_per_user: usize,
}

impl Default for RoomLimits {
    fn default() -> Self {
        RoomLimits {
            chat: Rate {
                max: 5,
                window: Duration::from_secs(10),
            },
            reactions: Rate {
                max: 10,
                window: Duration::from_secs(10),
            },
            reports: Rate {
                max: 3,
                window: Duration::from_secs(60),
            },
            max_participants: 100_000,
            max_sessions_per_user: 8,
        }
    }
}

/// Times of the recent actions of one kind by one participant (sans-IO sliding window).
#[derive(Debug, Default, Clone)]
struct Window {
    times: VecDeque<Instant>,
}

impl Window {
    /// Whether one more action at `now` fits in `rate` (does not record it).
    fn allows(&mut self, rate: Rate, now: Instant) -> bool {
        while let Some(&t) = self.times.front() {
            if now.saturating_duration_since(t) >= rate.window {
                self.times.pop_front();
            } else {
                break;
            }
        }
        self.times.len() < rate.max
    }

    fn record(&mut self, now: Instant) {
        self.times.push_back(now);
    }
}

#[derive(Debug, Default, Clone)]
struct Activity {
    chat: Window,
    reactions: Window,
    reports: Window,
}

/// One room's authoritative state. See the module documentation.
#[derive(Debug, Clone)]
pub struct Room {
    id: RoomId,
    limits: RoomLimits,
    phase: RoomPhase,
    /// Participants present, keyed by join order (so a lookup, a join and a leave cost
    /// O(log n), not a scan of a big room).
    participants: BTreeMap<u64, Participant>,
    /// Each present participant's key in `participants`.
    joined: HashMap<ParticipantId, u64>,
    /// The key of the next participant to join.
    next_join: u64,
    hands: Vec<ParticipantId>,
    banned: Vec<String>,
    /// The role each user last held here: a user who reconnects (new participant id) gets it back,
    /// and a demotion sticks until the room ends.
    roles: HashMap<String, RoomRole>,
    /// Chat and reaction windows per user (not per session: more sessions buy no more messages).
    activity: HashMap<String, Activity>,
    /// Sessions (participants present) per user.
    sessions: HashMap<String, usize>,
    created: Instant,
    created_unix_ms: u64,
    last_change: Instant,
}

impl Room {
    /// A live, empty room. `created_unix_ms` is the wall clock at `created` (chat timestamps are
    /// derived from it and `now`, so the core never reads a clock).
    pub fn new(id: RoomId, limits: RoomLimits, created: Instant, created_unix_ms: u64) -> Self {
        Room {
            id,
            limits,
            phase: RoomPhase::Live,
            participants: BTreeMap::new(),
            joined: HashMap::new(),
            next_join: 0,
            hands: Vec::new(),
            banned: Vec::new(),
            roles: HashMap::new(),
            activity: HashMap::new(),
            sessions: HashMap::new(),
            created,
            created_unix_ms,
            last_change: created,
        }
    }

    /// The room id.
    pub fn id(&self) -> RoomId {
        self.id
    }

    /// Live or ended.
    pub fn phase(&self) -> RoomPhase {
        self.phase
    }

    /// When the room last accepted a command (or was created).
    pub fn last_change(&self) -> Instant {
        self.last_change
    }

    /// The durable part of the room (state, and the role each user last held), as written whole
    /// after a reconcile or an end ([`Room::changes`] after other commands). Rate-limit windows
    /// are not durable.
    pub fn persisted(&self) -> crate::persist::PersistedRoom {
        let mut roles: Vec<(String, RoomRole)> =
            self.roles.iter().map(|(u, r)| (u.clone(), *r)).collect();
        roles.sort_by(|a, b| a.0.cmp(&b.0));
        crate::persist::PersistedRoom {
            state: self.snapshot(),
            roles,
        }
    }

    /// What `events`, just produced by this room, changed of its durable state: the
    /// participants they touched (as they are now, or gone), the hand queue and bans if they
    /// moved, the roles of the users involved; an end is written whole. Chat and reactions
    /// change nothing durable. Costs what changed, not the size of the room.
    pub fn changes(&self, events: &[RoomEvent]) -> crate::persist::RoomChanges {
        let mut c = crate::persist::RoomChanges::default();
        let (mut hands, mut banned) = (false, false);
        let mut touched = Vec::new();
        for e in events {
            match e {
                RoomEvent::ParticipantJoined { participant } => {
                    c.joined.push((participant.id, 0));
                    touched.push(participant.id);
                    c.roles.insert(participant.user.clone(), participant.role);
                }
                RoomEvent::RoleChanged { id, role, .. } => {
                    touched.push(*id);
                    if let Some(p) = self.participant(*id) {
                        c.roles.insert(p.user.clone(), *role);
                    }
                }
                RoomEvent::ParticipantLeft { id } => {
                    touched.push(*id);
                    hands = true;
                }
                RoomEvent::Muted { id, .. } | RoomEvent::Unmuted { id } => touched.push(*id),
                RoomEvent::Kicked { id, .. } => {
                    touched.push(*id);
                    banned = true;
                }
                RoomEvent::HandRaised { .. } | RoomEvent::HandLowered { .. } => hands = true,
                RoomEvent::Ended { .. } => {
                    return crate::persist::RoomChanges::full(&self.persisted())
                }
                RoomEvent::Chat { .. }
                | RoomEvent::Reaction { .. }
                | RoomEvent::Reported { .. } => {}
            }
        }
        for id in touched {
            c.participants.insert(id, self.participant(id).cloned());
        }
        c.joined
            .retain(|(id, _)| c.participants.get(id).is_some_and(Option::is_some));
        if hands {
            c.hands = Some(self.hands.clone());
        }
        if banned {
            c.banned = Some(self.banned.clone());
        }
        c
    }

    /// A room as it was persisted, restored at `now` (`now_unix_ms` is the wall clock then).
    pub fn restore(
        saved: crate::persist::PersistedRoom,
        limits: RoomLimits,
        now: Instant,
        now_unix_ms: u64,
    ) -> Self {
        let crate::persist::PersistedRoom { state, roles } = saved;
        let mut room = Room::new(state.room, limits, now, now_unix_ms);
        room.phase = state.phase;
        for p in state.participants {
            // Stored state has one record per id; a second record of an id is ignored.
            if room.joined.contains_key(&p.id) {
                continue;
            }
            *room.sessions.entry(p.user.clone()).or_default() += 1;
            room.insert(p);
        }
        room.hands = state.hands;
        room.banned = state.banned;
        room.roles = roles.into_iter().collect();
        room
    }

    /// The full state, as sent in `RoomSnapshot`.
    pub fn snapshot(&self) -> RoomState {
        RoomState {
            room: self.id,
            phase: self.phase,
            participants: self.participants.values().cloned().collect(),
            hands: self.hands.clone(),
            banned: self.banned.clone(),
        }
    }

    /// A participant by id.
    pub fn participant(&self, id: ParticipantId) -> Option<&Participant> {
        self.participants.get(self.joined.get(&id)?)
    }

    fn participant_mut(&mut self, id: ParticipantId) -> Option<&mut Participant> {
        self.participants.get_mut(self.joined.get(&id)?)
    }

    /// Participants present, in join order.
    pub fn participants(&self) -> impl ExactSizeIterator<Item = &Participant> + '_ {
        self.participants.values()
    }

    /// Add `p` (not present) last in join order.
    fn insert(&mut self, p: Participant) {
        self.joined.insert(p.id, self.next_join);
        self.participants.insert(self.next_join, p);
        self.next_join += 1;
    }

    /// Whether `id`'s audio may be relayed and mixed: present, a publishing role, not muted.
    pub fn may_be_heard(&self, id: ParticipantId) -> bool {
        self.participant(id)
            .is_some_and(|p| p.role.may_publish() && !p.muted)
    }

    /// Participants whose audio may be relayed and mixed (see [`Room::may_be_heard`]).
    pub fn audible(&self) -> impl Iterator<Item = ParticipantId> + '_ {
        self.participants
            .values()
            .filter(|p| p.role.may_publish() && !p.muted)
            .map(|p| p.id)
    }

    fn role_of(&self, id: ParticipantId) -> Result<RoomRole, Rejection> {
        match self.participant(id) {
            Some(p) => Ok(p.role),
            None => reject(
                RejectCode::NotFound,
                format!("participant {id} is not in the room"),
            ),
        }
    }

    /// Apply `command` from participant `actor` at `now`: the events to broadcast (possibly none
    /// when the command changes nothing, e.g. raising a raised hand), or why it was refused. A
    /// refusal leaves the room exactly as it was.
    pub fn apply(
        &mut self,
        actor: ParticipantId,
        command: RoomCommand,
        now: Instant,
    ) -> Result<Vec<RoomEvent>, Rejection> {
        if self.phase == RoomPhase::Ended {
            return reject(RejectCode::RoomEnded, format!("room {} has ended", self.id));
        }
        let events = match command {
            RoomCommand::Join {
                user,
                name,
                role,
                region,
                resume,
            } => self.join(
                actor,
                user,
                name,
                RoomRole::from_token(role),
                region,
                resume,
            )?,
            RoomCommand::Leave => {
                self.role_of(actor)?;
                self.remove(actor, None)
            }
            RoomCommand::RaiseHand => {
                let role = self.role_of(actor)?;
                if role != RoomRole::Listener {
                    return reject(RejectCode::Forbidden, "only listeners raise a hand");
                }
                if self.hands.contains(&actor) {
                    Vec::new()
                } else {
                    self.hands.push(actor);
                    vec![RoomEvent::HandRaised { id: actor }]
                }
            }
            RoomCommand::LowerHand { target } => {
                let role = self.role_of(actor)?;
                let target = target.unwrap_or(actor);
                self.role_of(target)?;
                if target == actor {
                    if role != RoomRole::Listener {
                        return reject(RejectCode::Forbidden, "only listeners have a hand");
                    }
                } else if !role.may_moderate() {
                    return reject(RejectCode::Forbidden, "only moderators lower others' hands");
                }
                self.lower_hand(target).into_iter().collect()
            }
            RoomCommand::Promote { target, role } => {
                let actor_role = self.role_of(actor)?;
                let target_role = self.role_of(target)?;
                match role {
                    RoomRole::Speaker => self.may_moderate(actor_role, target_role)?,
                    RoomRole::Cohost => {
                        if actor_role != RoomRole::Host {
                            return reject(RejectCode::Forbidden, "only hosts name co-hosts");
                        }
                        self.may_moderate(actor_role, target_role)?;
                    }
                    RoomRole::Host | RoomRole::Listener => {
                        return reject(
                            RejectCode::BadMessage,
                            "promote grants speaker or cohost (use demote for listener)",
                        )
                    }
                }
                self.set_role(target, role, actor)
            }
            RoomCommand::Demote { target } => {
                let actor_role = self.role_of(actor)?;
                let target_role = self.role_of(target)?;
                let stepping_down =
                    target == actor && matches!(actor_role, RoomRole::Cohost | RoomRole::Speaker);
                if !stepping_down {
                    self.may_moderate(actor_role, target_role)?;
                }
                self.set_role(target, RoomRole::Listener, actor)
            }
            RoomCommand::Mute { target } => {
                let actor_role = self.role_of(actor)?;
                let target = target.unwrap_or(actor);
                let target_role = self.role_of(target)?;
                if target == actor {
                    if !actor_role.may_publish() {
                        return reject(RejectCode::Forbidden, "listeners have no microphone");
                    }
                } else {
                    self.may_moderate(actor_role, target_role)?;
                    if !target_role.may_publish() {
                        return reject(RejectCode::Invalid, format!("{target} does not publish"));
                    }
                }
                let p = self.participant_mut(target).expect("target checked");
                if p.muted {
                    Vec::new()
                } else {
                    p.muted = true;
                    vec![RoomEvent::Muted {
                        id: target,
                        by: actor,
                    }]
                }
            }
            RoomCommand::Unmute => {
                let role = self.role_of(actor)?;
                if !role.may_publish() {
                    return reject(RejectCode::Forbidden, "listeners have no microphone");
                }
                let p = self.participant_mut(actor).expect("actor checked");
                if p.muted {
                    p.muted = false;
                    vec![RoomEvent::Unmuted { id: actor }]
                } else {
                    Vec::new()
                }
            }
            RoomCommand::Kick { target } => {
                let actor_role = self.role_of(actor)?;
                let target_role = self.role_of(target)?;
                if target == actor {
                    return reject(RejectCode::Invalid, "use leave to leave the room");
                }
                self.may_moderate(actor_role, target_role)?;
                self.kick(target, actor)
            }
            RoomCommand::End => {
                let role = self.role_of(actor)?;
                if role != RoomRole::Host {
                    return reject(RejectCode::Forbidden, "only hosts end the room");
                }
                self.end(Some(actor))
            }
            RoomCommand::Chat { text } => {
                self.role_of(actor)?;
                let text = text.trim();
                let chars = text.chars().count();
                if chars == 0 || chars > MAX_CHAT_CHARS {
                    return reject(
                        RejectCode::BadMessage,
                        format!("chat text must be 1 to {MAX_CHAT_CHARS} characters"),
                    );
                }
                if text.chars().any(|c| c.is_control() && c != '\n') {
                    return reject(RejectCode::BadMessage, "chat text has control characters");
                }
                self.trim_activity(now);
                let rate = self.limits.chat;
                let user = self.participant(actor).expect("actor checked").user.clone();
                let window = &mut self.activity.entry(user).or_default().chat;
                if !window.allows(rate, now) {
                    return reject(
                        RejectCode::RateLimited,
                        format!(
                            "at most {} chat messages per {} s",
                            rate.max,
                            rate.window.as_secs()
                        ),
                    );
                }
                window.record(now);
                let name = self.participant(actor).expect("actor checked").name.clone();
                vec![RoomEvent::Chat {
                    from: actor,
                    name,
                    text: text.to_string(),
                    at_ms: self.unix_ms(now),
                }]
            }
            RoomCommand::React { emoji } => {
                self.role_of(actor)?;
                let emoji = emoji.trim();
                let chars = emoji.chars().count();
                if chars == 0 || chars > MAX_REACTION_CHARS || emoji.chars().any(char::is_control) {
                    return reject(
                        RejectCode::BadMessage,
                        format!("a reaction is 1 to {MAX_REACTION_CHARS} printable characters"),
                    );
                }
                self.trim_activity(now);
                let rate = self.limits.reactions;
                let user = self.participant(actor).expect("actor checked").user.clone();
                let window = &mut self.activity.entry(user).or_default().reactions;
                if !window.allows(rate, now) {
                    return reject(
                        RejectCode::RateLimited,
                        format!(
                            "at most {} reactions per {} s",
                            rate.max,
                            rate.window.as_secs()
                        ),
                    );
                }
                window.record(now);
                vec![RoomEvent::Reaction {
                    from: actor,
                    emoji: emoji.to_string(),
                }]
            }
            RoomCommand::Report {
                target,
                reason,
                text,
            } => vec![RoomEvent::Reported {
                report: self.report(actor, target, reason, text, now)?,
            }],
        };
        self.last_change = self.last_change.max(now);
        Ok(events)
    }

    /// A report by `actor` at `now`, validated and counted against the user's report rate. The
    /// reported user may have left or been kicked: any user who joined the room since it
    /// started may be reported (a user the room never saw is `not_found`). The report's `id`
    /// is empty and `program_ms` unset: the driver, which knows the program, fills both.
    fn report(
        &mut self,
        actor: ParticipantId,
        target: ReportTarget,
        reason: ReportReason,
        text: String,
        now: Instant,
    ) -> Result<Report, Rejection> {
        let reporter = self.participant(actor).cloned().ok_or_else(|| Rejection {
            code: RejectCode::NotFound,
            message: format!("participant {actor} is not in the room"),
        })?;
        let text = text.trim();
        if text.chars().count() > MAX_REPORT_TEXT_CHARS {
            return reject(
                RejectCode::BadMessage,
                format!("report text must be at most {MAX_REPORT_TEXT_CHARS} characters"),
            );
        }
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return reject(RejectCode::BadMessage, "report text has control characters");
        }
        let target_name = match &target {
            ReportTarget::Room => None,
            ReportTarget::User(user) => {
                if *user == reporter.user {
                    return reject(RejectCode::Invalid, "you cannot report yourself");
                }
                if !self.roles.contains_key(user) && !self.banned.contains(user) {
                    return reject(RejectCode::NotFound, "that user has not been in this room");
                }
                self.participants
                    .values()
                    .find(|p| p.user == *user)
                    .map(|p| p.name.clone())
            }
        };
        self.trim_activity(now);
        let rate = self.limits.reports;
        let window = &mut self
            .activity
            .entry(reporter.user.clone())
            .or_default()
            .reports;
        if !window.allows(rate, now) {
            return reject(
                RejectCode::RateLimited,
                format!(
                    "at most {} reports per {} s",
                    rate.max,
                    rate.window.as_secs()
                ),
            );
        }
        window.record(now);
        Ok(Report {
            id: String::new(),
            room: self.id,
            reporter: reporter.user,
            reporter_name: reporter.name,
            reporter_id: actor,
            target,
            target_name,
            reason,
            text: text.to_string(),
            at_ms: self.unix_ms(now),
            program_ms: None,
        })
    }

    /// Whether housekeeping may forget this room at `now`: ended longer than `ended_memory`
    /// ago, or live, empty and without a command for `empty_idle`.
    pub fn forgettable(&self, now: Instant, cfg: &RoomsConfig) -> bool {
        let idle = now.saturating_duration_since(self.last_change);
        match self.phase {
            RoomPhase::Ended => idle >= cfg.ended_memory,
            RoomPhase::Live => self.participants.is_empty() && idle >= cfg.empty_idle,
        }
    }

    /// Replace this room's state with `saved` (its state reconciled with the stored one after
    /// the store came back, see [`crate::persist::reconcile`]), keeping its limits.
    pub fn reset(&mut self, saved: crate::persist::PersistedRoom, now: Instant, unix_ms: u64) {
        *self = Room::restore(saved, self.limits, now, unix_ms);
    }

    /// End the room (a host's `End`, or `by: None` for the REST API / an operator). Refused if it
    /// already ended.
    pub fn end_by(
        &mut self,
        by: Option<ParticipantId>,
        now: Instant,
    ) -> Result<Vec<RoomEvent>, Rejection> {
        if self.phase == RoomPhase::Ended {
            return reject(RejectCode::RoomEnded, format!("room {} has ended", self.id));
        }
        self.last_change = self.last_change.max(now);
        Ok(self.end(by))
    }

    fn end(&mut self, by: Option<ParticipantId>) -> Vec<RoomEvent> {
        self.phase = RoomPhase::Ended;
        self.hands.clear();
        self.activity.clear();
        vec![RoomEvent::Ended { by }]
    }

    /// Forget the windows of users without recent actions once there are many more windows
    /// than participants (bounded memory under churn).
    fn trim_activity(&mut self, now: Instant) {
        if self.activity.len() <= 2 * self.participants.len() + 64 {
            return;
        }
        let keep = self
            .limits
            .chat
            .window
            .max(self.limits.reactions.window)
            .max(self.limits.reports.window);
        self.activity.retain(|_, a| {
            [&a.chat, &a.reactions, &a.reports].iter().any(|w| {
                w.times
                    .back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < keep)
            })
        });
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.created).as_millis();
        self.created_unix_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Whether an actor of `actor` role may promote, demote, mute or kick a `target` role:
    /// hosts act on everyone but hosts, co-hosts on speakers and listeners.
    fn may_moderate(&self, actor: RoomRole, target: RoomRole) -> Result<(), Rejection> {
        let ok = match actor {
            RoomRole::Host => target != RoomRole::Host,
            RoomRole::Cohost => matches!(target, RoomRole::Speaker | RoomRole::Listener),
            RoomRole::Speaker | RoomRole::Listener => false,
        };
        if ok {
            Ok(())
        } else if actor.may_moderate() {
            reject(
                RejectCode::Forbidden,
                format!("a {actor:?} cannot moderate a {target:?}").to_lowercase(),
            )
        } else {
            reject(RejectCode::Forbidden, "only hosts and co-hosts moderate")
        }
    }

    fn join(
        &mut self,
        id: ParticipantId,
        user: String,
        name: String,
        token_role: RoomRole,
        region: String,
        resume: Option<RoomRole>,
    ) -> Result<Vec<RoomEvent>, Rejection> {
        if user.is_empty() || user.len() > MAX_USER_BYTES || user.chars().any(char::is_control) {
            return reject(
                RejectCode::BadMessage,
                format!("user must be 1 to {MAX_USER_BYTES} printable bytes"),
            );
        }
        if region.len() > MAX_REGION_BYTES || region.chars().any(char::is_control) {
            return reject(RejectCode::BadMessage, "region is too long");
        }
        if self.banned.contains(&user) {
            return reject(RejectCode::Banned, "you were removed from this room");
        }
        if let Some(p) = self.participant(id) {
            if p.user == user {
                // The edge re-announces a participant (link reconnect): nothing changes.
                return Ok(Vec::new());
            }
            return reject(
                RejectCode::Invalid,
                format!("participant id {id} belongs to someone else"),
            );
        }
        if self.participants.len() >= self.limits.max_participants {
            return reject(RejectCode::Limit, "the room is full");
        }
        let sessions = self.sessions.get(&user).copied().unwrap_or(0);
        if sessions >= self.limits.max_sessions_per_user {
            return reject(
                RejectCode::Limit,
                format!(
                    "at most {} sessions per user in a room",
                    self.limits.max_sessions_per_user
                ),
            );
        }
        let name: String = name
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_NAME_CHARS)
            .collect();
        let role = match self.roles.get(&user) {
            Some(&known) => known,
            None => resume.unwrap_or(token_role),
        };
        self.roles.insert(user.clone(), role);
        *self.sessions.entry(user.clone()).or_default() += 1;
        let participant = Participant {
            id,
            user,
            name,
            role,
            region,
            muted: false,
        };
        self.insert(participant.clone());
        Ok(vec![RoomEvent::ParticipantJoined { participant }])
    }

    fn lower_hand(&mut self, id: ParticipantId) -> Option<RoomEvent> {
        let i = self.hands.iter().position(|h| *h == id)?;
        self.hands.remove(i);
        Some(RoomEvent::HandLowered { id })
    }

    fn set_role(
        &mut self,
        target: ParticipantId,
        role: RoomRole,
        by: ParticipantId,
    ) -> Vec<RoomEvent> {
        let p = self.participant_mut(target).expect("target checked");
        if p.role == role {
            return Vec::new();
        }
        p.role = role;
        let user = p.user.clone();
        self.roles.insert(user, role);
        let mut events = vec![RoomEvent::RoleChanged {
            id: target,
            role,
            by,
        }];
        if role != RoomRole::Listener {
            events.extend(self.lower_hand(target));
        }
        events
    }

    /// Remove `id` (its hand first); `kicked_by` adds the `Kicked` event before it leaves.
    fn remove(&mut self, id: ParticipantId, kicked_by: Option<ParticipantId>) -> Vec<RoomEvent> {
        let mut events = Vec::with_capacity(3);
        events.extend(self.lower_hand(id));
        if let Some(by) = kicked_by {
            events.push(RoomEvent::Kicked { id, by });
        }
        if let Some(p) = self
            .joined
            .remove(&id)
            .and_then(|k| self.participants.remove(&k))
        {
            if let Some(n) = self.sessions.get_mut(&p.user) {
                *n -= 1;
                if *n == 0 {
                    // The user's windows stay (leaving and rejoining does not reset them);
                    // `trim_activity` forgets idle ones.
                    self.sessions.remove(&p.user);
                }
            }
        }
        events.push(RoomEvent::ParticipantLeft { id });
        events
    }

    /// Ban `target`'s user and remove every participant of that user.
    fn kick(&mut self, target: ParticipantId, by: ParticipantId) -> Vec<RoomEvent> {
        let user = self
            .participant(target)
            .expect("target checked")
            .user
            .clone();
        let sessions: Vec<ParticipantId> = self
            .participants
            .values()
            .filter(|p| p.user == user)
            .map(|p| p.id)
            .collect();
        let mut events = Vec::new();
        for id in sessions {
            events.extend(self.remove(id, Some(by)));
        }
        self.banned.push(user);
        events
    }
}

/// Tuning of [`Rooms`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomsConfig {
    /// Limits of every room.
    pub room: RoomLimits,
    /// Rooms held at most (live and remembered ended ones).
    pub max_rooms: usize,
    /// Ended rooms are remembered (refusing joins with `room_ended`) this long.
    pub ended_memory: Duration,
    /// Live rooms without participants are forgotten after this long without a command.
    pub empty_idle: Duration,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            room: RoomLimits::default(),
            max_rooms: 100_000,
            ended_memory: Duration::from_secs(6 * 3600),
            empty_idle: Duration::from_secs(6 * 3600),
        }
    }
}

/// What happened when a room was ended through [`Rooms::end`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A live room ended: broadcast these events.
    Ended(Vec<RoomEvent>),
    /// The room was unknown here; it is now remembered as ended.
    Unknown,
    /// The room had already ended.
    AlreadyEnded,
}

/// Participants the room authority holds in live rooms, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorityCensus {
    /// Live rooms.
    pub live_rooms: usize,
    /// Participants of live rooms by (role, region of their edge).
    pub participants: BTreeMap<(RoomRole, String), usize>,
}

/// One room held by [`Rooms`], behind the room's own lock, with what the driver keeps per room
/// (`book`: the hub's owners of participants and edges holding the room's state).
#[derive(Debug)]
pub struct Held<T> {
    /// The room's authoritative state.
    pub room: Room,
    /// The driver's bookkeeping of this room.
    pub book: T,
    /// Created for a `Join` and never had a participant: forgotten again if it is still empty
    /// after the command (a refused join creates no room).
    fresh: bool,
    /// Forgotten (housekeeping, or a fresh room whose join was refused): a caller that waited
    /// for this lock looks the room up again.
    gone: bool,
}

impl<T: Default> Held<T> {
    fn new(room: Room, fresh: bool) -> Self {
        Held {
            room,
            book: T::default(),
            fresh,
            gone: false,
        }
    }
}

/// A room's slot in [`Rooms`].
type Slot<T> = Arc<Mutex<Held<T>>>;

/// How often a caller looks a room up again after finding its slot forgotten. A slot is
/// removed from the map before its lock is released, so the second look finds the room's
/// new slot or none; this only bounds pathological churn.
const LOOKUPS: usize = 8;

fn lock_held<T>(slot: &Mutex<Held<T>>) -> MutexGuard<'_, Held<T>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a caller waits for a room's lock that another caller holds: it runs the given wait
/// exactly once. [`Rooms::waiting_with`] sets it (an async driver hands its executor thread's
/// other work elsewhere meanwhile); by default the caller's thread just waits.
pub type Wait = fn(&mut dyn FnMut());

fn wait_here(wait: &mut dyn FnMut()) {
    wait()
}

/// Every room of this origin, each behind its own lock: commands in one room never wait for
/// another room's. Creates a room on its first `Join`, remembers ended rooms, forgets idle ones
/// in [`Rooms::housekeeping`]. Time comes in as `now` (no clock, no IO).
///
/// Locks: the map of rooms is behind a short-held lock that is never held while a room's lock
/// is waited for; a room's lock may be held while the map is locked (to add or forget that
/// room). Walks over every room ([`Rooms::census`], [`Rooms::bans`], [`Rooms::each`]) copy the
/// list of rooms first and lock each room alone; housekeeping skips a room that is busy.
#[derive(Debug)]
pub struct Rooms<T = ()> {
    cfg: RoomsConfig,
    map: RwLock<HashMap<RoomId, Slot<T>>>,
    wait: Wait,
}

impl<T: Default> Default for Rooms<T> {
    fn default() -> Self {
        Rooms::new(RoomsConfig::default())
    }
}

impl<T: Default> Rooms<T> {
    /// No rooms yet.
    pub fn new(cfg: RoomsConfig) -> Self {
        Rooms {
            cfg,
            map: RwLock::new(HashMap::new()),
            wait: wait_here,
        }
    }

    /// These rooms, waiting for a busy room's lock through `wait` (see [`Wait`]).
    pub fn waiting_with(self, wait: Wait) -> Self {
        Rooms { wait, ..self }
    }

    /// Lock `slot`: at once if it is free, else through [`Wait`].
    fn lock<'a>(&self, slot: &'a Mutex<Held<T>>) -> MutexGuard<'a, Held<T>> {
        match slot.try_lock() {
            Ok(held) => held,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let mut held = None;
                (self.wait)(&mut || held = Some(lock_held(slot)));
                held.unwrap_or_else(|| lock_held(slot))
            }
        }
    }

    fn map_read(&self) -> RwLockReadGuard<'_, HashMap<RoomId, Slot<T>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn map_write(&self) -> RwLockWriteGuard<'_, HashMap<RoomId, Slot<T>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Rooms held (live and ended).
    pub fn len(&self) -> usize {
        self.map_read().len()
    }

    /// Whether no room is held.
    pub fn is_empty(&self) -> bool {
        self.map_read().is_empty()
    }

    /// Whether `room` is held.
    pub fn contains(&self, room: RoomId) -> bool {
        self.map_read().contains_key(&room)
    }

    fn slot(&self, room: RoomId) -> Option<Slot<T>> {
        self.map_read().get(&room).cloned()
    }

    /// Forget `room` if `slot` is still its slot (the caller holds the slot's lock).
    fn forget(&self, room: RoomId, slot: &Slot<T>, held: &mut Held<T>) {
        held.gone = true;
        let mut map = self.map_write();
        if map.get(&room).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(&room);
        }
    }

    /// Run `f` on `room` under its lock; `None` if the room is not held.
    pub fn with<R>(&self, room: RoomId, f: impl FnOnce(&mut Held<T>) -> R) -> Option<R> {
        for _ in 0..LOOKUPS {
            let slot = self.slot(room)?;
            let mut held = self.lock(&slot);
            if !held.gone {
                return Some(f(&mut held));
            }
        }
        None
    }

    /// Run `f` (a command for `room`) under the room's lock. If the room is not held and
    /// `create` is given (a `Join` at `(now, unix_ms)`), a live empty room is created for it
    /// first, unless the origin holds [`RoomsConfig::max_rooms`] rooms; a created room still
    /// empty after `f` (its join was refused) is forgotten again.
    pub fn with_or_create<R>(
        &self,
        room: RoomId,
        create: Option<(Instant, u64)>,
        f: impl FnOnce(&mut Held<T>) -> R,
    ) -> Result<R, Rejection> {
        let mut f = Some(f);
        for _ in 0..LOOKUPS {
            let slot = match self.slot(room) {
                Some(slot) => slot,
                None => {
                    let Some((now, unix_ms)) = create else {
                        return reject(
                            RejectCode::NotFound,
                            format!("room {room} has nobody in it"),
                        );
                    };
                    let mut map = self.map_write();
                    match map.get(&room) {
                        Some(slot) => slot.clone(),
                        None if map.len() >= self.cfg.max_rooms => {
                            return reject(RejectCode::Limit, "this origin holds too many rooms")
                        }
                        None => {
                            let fresh = Room::new(room, self.cfg.room, now, unix_ms);
                            let slot = Arc::new(Mutex::new(Held::new(fresh, true)));
                            map.insert(room, slot.clone());
                            slot
                        }
                    }
                }
            };
            let mut held = self.lock(&slot);
            if held.gone {
                continue;
            }
            let f = f.take().expect("called once: every path after it returns");
            let out = f(&mut held);
            if held.fresh {
                if held.room.participants.is_empty() && held.room.phase == RoomPhase::Live {
                    self.forget(room, &slot, &mut held);
                } else {
                    held.fresh = false;
                }
            }
            return Ok(out);
        }
        reject(RejectCode::Limit, format!("room {room} is being replaced"))
    }

    /// Every room's slot, copied out of the map.
    fn slots(&self) -> Vec<(RoomId, Slot<T>)> {
        self.map_read()
            .iter()
            .map(|(id, slot)| (*id, slot.clone()))
            .collect()
    }

    /// Run `f` on every room, one room's lock at a time (the list of rooms is copied first;
    /// rooms added meanwhile are not visited).
    pub fn each(&self, mut f: impl FnMut(&mut Held<T>)) {
        for (_, slot) in self.slots() {
            let mut held = self.lock(&slot);
            if !held.gone {
                f(&mut held);
            }
        }
    }

    /// Live rooms and their participants by (role, region of their edge).
    pub fn census(&self) -> AuthorityCensus {
        let mut census = AuthorityCensus::default();
        self.each(|held| {
            let room = &held.room;
            if room.phase != RoomPhase::Live {
                return;
            }
            census.live_rooms += 1;
            for p in room.participants.values() {
                *census
                    .participants
                    .entry((p.role, p.region.clone()))
                    .or_default() += 1;
            }
        });
        census
    }

    /// The banned users of every live room, as (room, user).
    pub fn bans(&self) -> Vec<(RoomId, String)> {
        let mut bans = Vec::new();
        self.each(|held| {
            let r = &held.room;
            if r.phase == RoomPhase::Live {
                bans.extend(r.banned.iter().map(|u| (r.id, u.clone())));
            }
        });
        bans
    }

    /// Take back a persisted room (after an origin restart) and run `f` on it under its lock
    /// (before any command can reach it). Refused (`false`, `f` not run) if the room is already
    /// held or the origin is full.
    pub fn restore(
        &self,
        saved: crate::persist::PersistedRoom,
        now: Instant,
        unix_ms: u64,
        f: impl FnOnce(&mut Held<T>),
    ) -> bool {
        let id = saved.state.room;
        let room = Room::restore(saved, self.cfg.room, now, unix_ms);
        let slot = Arc::new(Mutex::new(Held::new(room, false)));
        let mut held = lock_held(&slot);
        {
            let mut map = self.map_write();
            if map.contains_key(&id) || map.len() >= self.cfg.max_rooms {
                return false;
            }
            map.insert(id, slot.clone());
        }
        f(&mut held);
        true
    }

    /// End `room` from outside the room (REST API through a geo-router, an edge's `RoomEnded`)
    /// and run `f` under its lock with what happened. An unknown room is remembered as ended
    /// (unless the origin is full: then `f` gets no room).
    pub fn end<R>(
        &self,
        room: RoomId,
        now: Instant,
        unix_ms: u64,
        f: impl FnOnce(Option<&mut Held<T>>, Ending) -> R,
    ) -> R {
        let mut f = Some(f);
        for _ in 0..LOOKUPS {
            let (slot, created) = match self.slot(room) {
                Some(slot) => (slot, false),
                None => {
                    let mut map = self.map_write();
                    match map.get(&room) {
                        Some(slot) => (slot.clone(), false),
                        None if map.len() >= self.cfg.max_rooms => break,
                        None => {
                            let mut r = Room::new(room, self.cfg.room, now, unix_ms);
                            r.end(None);
                            let slot = Arc::new(Mutex::new(Held::new(r, false)));
                            map.insert(room, slot.clone());
                            (slot, true)
                        }
                    }
                }
            };
            let mut held = self.lock(&slot);
            if held.gone {
                continue;
            }
            let ending = if created {
                Ending::Unknown
            } else {
                match held.room.end_by(None, now) {
                    Ok(events) => Ending::Ended(events),
                    Err(_) => Ending::AlreadyEnded,
                }
            };
            let f = f.take().expect("called once: every path after it returns");
            return f(Some(&mut held), ending);
        }
        let f = f.take().expect("not called yet");
        f(None, Ending::Unknown)
    }

    /// Forget ended rooms older than `ended_memory` and empty live rooms idle for `empty_idle`,
    /// calling `f` on each under its lock before it goes; returns the forgotten ids. A room
    /// whose lock is held is left for the next round.
    pub fn housekeeping(
        &self,
        now: Instant,
        mut f: impl FnMut(RoomId, &mut Held<T>),
    ) -> Vec<RoomId> {
        let cfg = self.cfg;
        let mut gone = Vec::new();
        for (id, slot) in self.slots() {
            let mut held = match slot.try_lock() {
                Ok(held) => held,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            if held.gone || !held.room.forgettable(now, &cfg) {
                continue;
            }
            f(id, &mut held);
            self.forget(id, &slot, &mut held);
            gone.push(id);
        }
        gone
    }
}

#[cfg(test)]
mod tests;
