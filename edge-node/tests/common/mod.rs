//! The edge tests' harness: the shared one from `amphi-testkit` (a fake geo-router, a passive
//! quinn origin stand-in, the real room authority, edges started with `run`).
#![allow(dead_code)] // each test binary uses a different subset

pub use amphi_testkit::edge::*;
