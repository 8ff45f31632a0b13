//! Sans-IO state of what this edge has told (or must tell) the origin: current publishers and the
//! rooms with participants here. It turns peer events into control messages, and produces the full
//! set again after every (re)connect.

use amphi_protocol::control::ControlMessage;
use amphi_protocol::{ParticipantId, RoomId};
use std::collections::BTreeMap;

/// Something that happened to a peer, as the uplink needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshEvent {
    /// A participant session was created in `room`.
    PeerAdded {
        /// The room.
        room: RoomId,
    },
    /// A participant session in `room` was removed.
    PeerRemoved {
        /// The room.
        room: RoomId,
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

/// Publishers and subscribed rooms of this edge.
#[derive(Debug)]
pub struct MeshState {
    region: String,
    publishers: BTreeMap<ParticipantId, (RoomId, String)>,
    rooms: BTreeMap<RoomId, usize>,
}

impl MeshState {
    /// State for an edge serving `region` (carried in `SpeakerJoined`).
    pub fn new(region: impl Into<String>) -> Self {
        MeshState {
            region: region.into(),
            publishers: BTreeMap::new(),
            rooms: BTreeMap::new(),
        }
    }

    /// Apply an event; returns the control messages to send now (if connected; otherwise they
    /// are covered by the next [`MeshState::resync`]).
    pub fn apply(&mut self, ev: MeshEvent) -> Vec<ControlMessage> {
        match ev {
            MeshEvent::PeerAdded { room } => {
                let n = self.rooms.entry(room).or_insert(0);
                *n += 1;
                if *n == 1 {
                    vec![ControlMessage::SubscribeRoom { room }]
                } else {
                    Vec::new()
                }
            }
            MeshEvent::PeerRemoved { room } => match self.rooms.get_mut(&room) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    Vec::new()
                }
                Some(_) => {
                    self.rooms.remove(&room);
                    vec![ControlMessage::UnsubscribeRoom { room }]
                }
                None => Vec::new(),
            },
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

    /// Everything the origin must learn after a (re)connect: subscriptions, then publishers.
    pub fn resync(&self) -> Vec<ControlMessage> {
        let subs = self
            .rooms
            .keys()
            .map(|&room| ControlMessage::SubscribeRoom { room });
        let pubs =
            self.publishers
                .iter()
                .map(|(&speaker, (room, name))| ControlMessage::SpeakerJoined {
                    room: *room,
                    speaker,
                    name: name.clone(),
                    region: self.region.clone(),
                });
        subs.chain(pubs).collect()
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
    fn rooms_are_subscribed_on_first_peer_and_unsubscribed_on_last() {
        let mut m = MeshState::new("us-east");
        let r = RoomId(1);
        assert_eq!(
            m.apply(MeshEvent::PeerAdded { room: r }),
            vec![ControlMessage::SubscribeRoom { room: r }]
        );
        assert!(m.apply(MeshEvent::PeerAdded { room: r }).is_empty());
        assert!(m.apply(MeshEvent::PeerRemoved { room: r }).is_empty());
        assert_eq!(
            m.apply(MeshEvent::PeerRemoved { room: r }),
            vec![ControlMessage::UnsubscribeRoom { room: r }]
        );
        assert!(m.apply(MeshEvent::PeerRemoved { room: r }).is_empty());
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
    fn resync_repeats_current_subscriptions_and_publishers() {
        let mut m = MeshState::new("us-east");
        m.apply(MeshEvent::PeerAdded { room: RoomId(2) });
        m.apply(MeshEvent::PeerAdded { room: RoomId(1) });
        m.apply(up(2, 5));
        m.apply(up(1, 9));
        m.apply(up(1, 10));
        m.apply(MeshEvent::PublisherDown {
            room: RoomId(1),
            speaker: ParticipantId(10),
        });
        let msgs = m.resync();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0], ControlMessage::SubscribeRoom { room: RoomId(1) });
        assert_eq!(msgs[1], ControlMessage::SubscribeRoom { room: RoomId(2) });
        assert!(matches!(
            &msgs[2],
            ControlMessage::SpeakerJoined { speaker, room, .. } if *speaker == ParticipantId(5) && *room == RoomId(2)
        ));
        assert!(matches!(
            &msgs[3],
            ControlMessage::SpeakerJoined { speaker, .. } if *speaker == ParticipantId(9)
        ));
    }
}
