//! amphi geo-router: the front door. Room directory, token minting, edge selection (`/v1/route`), the
//! embedded web client and a proxy to the packager's HLS origin under `/hls/`.

pub mod directory;
pub mod http;
pub mod origins;
pub mod select;

pub use http::{run, RouterError, RouterSetup, WebAsset};
