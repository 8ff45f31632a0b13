//! amphi test tooling (not part of the shipped `amphi` binary): the userspace link emulator of
//! the namespace test bed (`amphi-netem`: [`netem`] is its sans-IO core, [`nfqueue`] its driver's
//! netlink client) and the bed's plan and config rendering ([`bed`]).

pub mod bed;
pub mod netem;
pub mod nfqueue;
