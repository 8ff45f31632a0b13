//! Identifiers shared by every component.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A room id: 64 random bits, written as 16 lowercase hex digits in URLs and JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub u64);

/// Why a room id string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("room id must be 16 hex digits")]
pub struct BadRoomId;

impl RoomId {
    /// A fresh random room id (never zero).
    pub fn random() -> Self {
        loop {
            let v: u64 = rand::random();
            if v != 0 {
                return RoomId(v);
            }
        }
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomId({self})")
    }
}

impl FromStr for RoomId {
    type Err = BadRoomId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 {
            return Err(BadRoomId);
        }
        // One pass over the 16 hex digits (either case).
        s.bytes()
            .try_fold(0u64, |id, b| {
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    b'A'..=b'F' => b - b'A' + 10,
                    _ => return Err(BadRoomId),
                };
                Ok(id << 4 | u64::from(digit))
            })
            .map(RoomId)
    }
}

impl Serialize for RoomId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RoomId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Bits of a [`ParticipantId`] that carry the allocating edge's index (the high bits).
pub const EDGE_INDEX_BITS: u32 = 12;
/// The highest edge index (4,095): a mesh holds at most 4,096 edges.
pub const MAX_EDGE_INDEX: u16 = (1 << EDGE_INDEX_BITS) - 1;

/// A participant's media id inside a room: the `speaker` field of relay frames.
/// Edges allocate it from their own range (`edge_index << 20 | counter`, [`EDGE_INDEX_BITS`]
/// of index) so ids never collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct ParticipantId(pub u32);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_id_round_trips_through_text_and_json() {
        let id = RoomId(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<RoomId>(), Ok(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00abcdef01234567\"");
        assert_eq!(serde_json::from_str::<RoomId>(&json).unwrap(), id);
    }

    #[test]
    fn room_id_rejects_bad_text() {
        for bad in [
            "",
            "abc",
            "00abcdef0123456g",
            "00abcdef012345678",
            "../../etc/passwd",
            "+0abcdef01234567",
            "00abcdef0123456é",
        ] {
            assert_eq!(bad.parse::<RoomId>(), Err(BadRoomId), "{bad}");
        }
    }

    #[test]
    fn room_id_text_reads_as_hexadecimal_in_either_case() {
        for text in [
            "00ABCDEF01234567",
            "ffffffffffffffff",
            "0000000000000000",
            "7fA0b1C2d3E4f5a6",
        ] {
            assert_eq!(
                text.parse::<RoomId>().map(|r| r.0),
                Ok(u64::from_str_radix(text, 16).unwrap()),
                "{text}"
            );
        }
    }
}
