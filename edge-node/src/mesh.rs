//! Sans-IO state of what this edge has told (or must tell) the origin about its publishers. It turns
//! peer events into control messages, and produces the full set again after every (re)connect.
//! Room subscriptions and participants are announced by the signaling core
//! ([`crate::signaling::SignalingCore::link_up`]).

use amphi_protocol::control::ControlMessage;
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::BTreeMap;

/// Something that happened to a peer, as the uplink needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshEvent {
    /// A control message from the signaling core, valid for uplink connection `epoch` only
    /// (messages of an earlier connection are covered by the resync of the new one).
    Control {
        /// Connection epoch the message was produced for.
        epoch: u64,
        /// The message.
        msg: ControlMessage,
    },
    /// A publisher's media connected (ICE+DTLS up, or first RTP).
    PublisherUp {
        /// The room.
        room: RoomId,
        /// Its media id.
        speaker: ParticipantId,
        /// Display name from the token.
        name: String,
    },
    /// A publisher that was up is gone.
    PublisherDown {
        /// The room.
        room: RoomId,
        /// Its media id.
        speaker: ParticipantId,
    },
}

/// Publishers of this edge.
#[derive(Debug)]
pub struct MeshState {
    region: String,
    publishers: BTreeMap<ParticipantId, (RoomId, String)>,
}

impl MeshState {
    /// State for an edge serving `region` (carried in `SpeakerJoined`).
    pub fn new(region: impl Into<String>) -> Self {
        MeshState {
            region: region.into(),
            publishers: BTreeMap::new(),
        }
    }

    /// Apply an event; returns the control messages to send now (if connected; otherwise they
    /// are covered by the next [`MeshState::resync`]).
    pub fn apply(&mut self, ev: MeshEvent) -> Vec<ControlMessage> {
        match ev {
            MeshEvent::Control { msg, .. } => vec![msg],
            MeshEvent::PublisherUp {
                room,
                speaker,
                name,
            } => {
                if self.publishers.contains_key(&speaker) {
                    return Vec::new();
                }
                self.publishers.insert(speaker, (room, name.clone()));
                vec![ControlMessage::SpeakerJoined {
                    room,
                    speaker,
                    name,
                    region: self.region.clone(),
                }]
            }
            MeshEvent::PublisherDown { room, speaker } => {
                if self.publishers.remove(&speaker).is_some() {
                    vec![ControlMessage::SpeakerLeft { room, speaker }]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Everything the origin must learn about publishers after a (re)connect.
    pub fn resync(&self) -> Vec<ControlMessage> {
        self.publishers
            .iter()
            .map(|(&speaker, (room, name))| ControlMessage::SpeakerJoined {
                room: *room,
                speaker,
                name: name.clone(),
                region: self.region.clone(),
            })
            .collect()
    }

    /// [`MeshState::resync`] for the publishers of `rooms` only (announced to a room's new owner).
    pub fn resync_rooms(&self, rooms: &std::collections::BTreeSet<RoomId>) -> Vec<ControlMessage> {
        self.resync()
            .into_iter()
            .filter(
                |m| matches!(m, ControlMessage::SpeakerJoined { room, .. } if rooms.contains(room)),
            )
            .collect()
    }

    /// Number of current publishers.
    pub fn publisher_count(&self) -> usize {
        self.publishers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(room: u64, sp: u32) -> MeshEvent {
        MeshEvent::PublisherUp {
            room: RoomId(room),
            speaker: ParticipantId(sp),
            name: format!("n{sp}"),
        }
    }

    #[test]
    fn publishers_join_once_and_leave_once() {
        let mut m = MeshState::new("eu-west");
        let joined = m.apply(up(1, 7));
        assert_eq!(
            joined,
            vec![ControlMessage::SpeakerJoined {
                room: RoomId(1),
                speaker: ParticipantId(7),
                name: "n7".into(),
                region: "eu-west".into()
            }]
        );
        assert!(m.apply(up(1, 7)).is_empty(), "duplicate up is ignored");
        let down = MeshEvent::PublisherDown {
            room: RoomId(1),
            speaker: ParticipantId(7),
        };
        assert_eq!(
            m.apply(down.clone()),
            vec![ControlMessage::SpeakerLeft {
                room: RoomId(1),
                speaker: ParticipantId(7)
            }]
        );
        assert!(m.apply(down).is_empty());
        assert_eq!(m.publisher_count(), 0);
    }

    #[test]
    fn resync_repeats_current_publishers() {
        let mut m = MeshState::new("us-east");
        m.apply(up(2, 5));
        m.apply(up(1, 9));
        m.apply(up(1, 10));
        m.apply(MeshEvent::PublisherDown {
            room: RoomId(1),
            speaker: ParticipantId(10),
        });
        let msgs = m.resync();
        assert_eq!(msgs.len(), 2);
        assert!(matches!(
            &msgs[0],
            ControlMessage::SpeakerJoined { speaker, room, .. } if *speaker == ParticipantId(5) && *room == RoomId(2)
        ));
        assert!(matches!(
            &msgs[1],
            ControlMessage::SpeakerJoined { speaker, .. } if *speaker == ParticipantId(9)
        ));
        // A room announced to its new owner carries only its own publishers.
        let only = m.resync_rooms(&std::collections::BTreeSet::from([RoomId(2)]));
        assert_eq!(only, vec![msgs[0].clone()]);
    }
}
