//! amphi's shared vocabulary: every type that crosses a process boundary lives here.
//!
//! No IO: codecs take and return bytes, token code takes an explicit `now`. The one exception,
//! behind the `https` feature, is the `https` module: the HTTP client and TLS listener every
//! HTTP role shares, kept here so it is written once.
//!
//! What is shared but not a wire format (mTLS material, metrics, log redaction, the circuit
//! breaker) lives in `amphi-common`.

pub mod api;
pub mod audio;
pub mod config;
pub mod control;
#[cfg(feature = "https")]
pub mod h1;
#[cfg(feature = "https")]
pub mod https;
pub mod ids;
pub mod limits;
pub mod ownership;
pub mod placement;
pub mod push;
pub mod relay;
pub mod room;
pub mod token;

pub use ids::{ParticipantId, RoomId};
