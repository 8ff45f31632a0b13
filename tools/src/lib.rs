//! amphi test tooling (not part of the shipped `amphi` binary): the userspace link emulator of
//! the namespace test bed (`amphi-netem`: [`netem`] is its sans-IO core, [`nfqueue`] its driver's
//! netlink client), the bed's plan ([`bed`]), and the Terraform
//! template renderer shared by the bed and the config tests ([`tfrender`]).

pub mod bed;
pub mod netem;
pub mod nfqueue;
pub mod tfrender;
