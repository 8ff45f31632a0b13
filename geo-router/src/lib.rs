//! amphi geo-router: the front door. Room directory, token minting, GeoIP edge selection
//! (`/v1/route`), the edge registry (heartbeats, health, draining), signed webhooks, links to the
//! origins (ending rooms), the embedded web client and a proxy to the packager's HLS origin under
//! `/hls/`.

#![warn(missing_docs)]

pub mod answer;
pub mod answer_cache;
pub mod auth;
pub mod bodies;
pub mod client_ip;
pub mod directory;
pub mod geoip;
pub mod http;
pub mod metrics;
pub mod origins;
pub mod registry;
pub mod reminders;
pub mod route_query;
pub mod select;
pub mod store;
pub mod webhooks;

pub use http::{run, RouterError, RouterSetup, WebAsset, ROUTES};
