//! The edge tests' harness: the shared one from `amphi-testkit` (a fake geo-router, a passive
//! quinn origin stand-in, edges started with `run`) plus a room authority in [`authority`].
#![allow(dead_code)] // each test binary uses a different subset

pub mod authority;

pub use amphi_testkit::edge::*;
