//! amphi infrastructure shared by every role that is not a wire format (those live in
//! `amphi-protocol`): the mesh's mutual-TLS material ([`mtls`]), the `/metrics` registry
//! ([`metrics`]), keeping secrets out of logs and the HTTP request log ([`redact`]), and the
//! circuit breaker in front of Redis ([`breaker`]).

#![warn(missing_docs)]

pub mod breaker;
pub mod metrics;
pub mod mtls;
pub mod redact;
