//! amphi's shared vocabulary: every type that crosses a process boundary lives here.
//!
//! No IO: codecs take and return bytes, token code takes an explicit `now`.

pub mod api;
pub mod audio;
pub mod config;
pub mod control;
pub mod ids;
pub mod metrics;
pub mod mtls;
pub mod ownership;
pub mod placement;
pub mod redact;
pub mod relay;
pub mod room;
pub mod token;

pub use ids::{ParticipantId, RoomId};
