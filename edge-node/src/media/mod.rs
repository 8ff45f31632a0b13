//! The edge's media path, per shard: a sans-IO [`core`] (str0m peers, slot selection, fan-out)
//! driven by a thin [`driver`] that owns the socket and the QUIC relay; [`api`] holds the
//! messages the rest of the edge exchanges with it.

pub(crate) mod api;
pub(crate) mod core;
pub(crate) mod driver;
