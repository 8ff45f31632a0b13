//! amphi's test and measurement kit, never compiled into a server: the str0m-based WebRTC
//! clients ([`whip_client`], [`whep_client`]) that the tests, load generators and benchmarks
//! publish and listen with, the LL-HLS conformance checker ([`conformance`]), synthetic audio
//! ([`synth`]), and the harnesses the integration tests share: an `amphi dev` mesh in a child
//! process ([`mesh`]), an edge with a stand-in origin and geo-router ([`edge`]), a packager with an
//! origin stand-in ([`packager`]), and free loopback ports and scratch directories ([`net`]).

#![warn(missing_docs)]

pub mod conformance;
pub mod edge;
pub mod mesh;
pub mod net;
pub mod packager;
pub mod synth;
pub mod whep_client;
pub mod whip_client;
