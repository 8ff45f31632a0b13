//! Room placement: which origin owns a room. Rendezvous (highest random weight) hashing over the
//! configured origins' ids, so every edge and geo-router computes the same owner from the same
//! list, and removing an origin only moves the rooms it owned. Sans-IO, stable across processes
//! and versions (FNV-1a + the splitmix64 finalizer, not `DefaultHasher`).

use crate::config::OriginEndpoint;
use crate::ids::RoomId;

/// Something that names an origin for placement (its stable id is the hashing key).
pub trait OriginKey {
    /// The origin's stable id.
    fn origin_id(&self) -> &str;
}

impl OriginKey for OriginEndpoint {
    fn origin_id(&self) -> &str {
        &self.id
    }
}

impl OriginKey for String {
    fn origin_id(&self) -> &str {
        self
    }
}

impl OriginKey for &str {
    fn origin_id(&self) -> &str {
        self
    }
}

/// 64-bit FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finalizer: spreads the bits of a combined hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous score of the origin named `origin_id` for `room`; the highest score owns the room.
pub fn score(origin_id: &str, room: RoomId) -> u64 {
    mix(fnv1a(origin_id.as_bytes()) ^ mix(room.0))
}

/// The origin that owns `room`: the highest [`score`], ties broken by the smaller id. `None` only
/// when `origins` is empty.
pub fn rendezvous<O: OriginKey>(room: RoomId, origins: &[O]) -> Option<&O> {
    rendezvous_among(room, origins)
}

/// [`rendezvous`] over any sequence of origins (e.g. only the healthy ones).
pub fn rendezvous_among<'a, O: OriginKey + 'a>(
    room: RoomId,
    origins: impl IntoIterator<Item = &'a O>,
) -> Option<&'a O> {
    origins.into_iter().max_by(|a, b| {
        let (a, b) = (a.origin_id(), b.origin_id());
        score(a, room).cmp(&score(b, room)).then_with(|| b.cmp(a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("origin-{i}")).collect()
    }

    #[test]
    fn one_origin_owns_everything_and_none_owns_nothing() {
        let one = ["origin-1"];
        for r in 0..100 {
            assert_eq!(rendezvous(RoomId(r), &one), Some(&"origin-1"));
        }
        let none: [&str; 0] = [];
        assert_eq!(rendezvous(RoomId(1), &none), None);
    }

    #[test]
    fn stable_order_independent_and_balanced() {
        let origins = ids(4);
        let mut reversed = origins.clone();
        reversed.reverse();
        let mut counts = [0usize; 4];
        for r in 0..4000u64 {
            let room = RoomId(r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let owner = rendezvous(room, &origins).unwrap();
            assert_eq!(rendezvous(room, &reversed), Some(owner));
            counts[origins.iter().position(|o| o == owner).unwrap()] += 1;
        }
        // Each of 4 origins gets roughly a quarter (1000 +- 20 %).
        assert!(
            counts.iter().all(|&c| (800..=1200).contains(&c)),
            "{counts:?}"
        );
        // Golden values: the function must not change between versions (edges and routers of
        // different builds must agree on every room's owner).
        assert_eq!(score("origin-0", RoomId(1)), 0x00c5_9acd_b59a_cb7c);
        assert_eq!(
            score("origin-1", RoomId(0x00ab_cdef_0123_4567)),
            0xd70f_2b1c_2222_0703
        );
        // The geo-router's pinned value from before it used this module.
        assert_eq!(score("origin-1", RoomId(42)), 0x35f3_e691_1276_d649);
    }

    #[test]
    fn removing_an_origin_only_moves_its_rooms() {
        let all = ids(5);
        let fewer: Vec<String> = all.iter().filter(|o| *o != "origin-2").cloned().collect();
        for r in 0..2000u64 {
            let room = RoomId(r.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ 0x1234);
            let before = rendezvous(room, &all).unwrap();
            let after = rendezvous(room, &fewer).unwrap();
            if before != "origin-2" {
                assert_eq!(before, after, "room {room} moved");
            }
        }
    }

    #[test]
    fn works_on_configured_endpoints() {
        let eps: Vec<OriginEndpoint> = ["a", "b"]
            .iter()
            .map(|id| OriginEndpoint {
                id: id.to_string(),
                addr: "127.0.0.1:8300".parse().unwrap(),
                server_name: "origin.amphi.internal".into(),
            })
            .collect();
        let room = RoomId(42);
        let owner = rendezvous(room, &eps).unwrap();
        let by_id = rendezvous(room, &["a", "b"]).unwrap();
        assert_eq!(owner.id, *by_id);
    }
}
