//! What the balancer says about itself while it runs, kept where the request
//! path and the admin listener can both reach it: the access log
//! (`access_log`), the process log's level policy and the [`logging::Throttle`]
//! that keeps one kind of event from flooding it (`logging`), and the
//! per-request metrics the proxy counts into (`metrics`), and the fast text
//! of what every request writes (`text`).
//!
//! It imports nothing else of the crate: everything above it may log and
//! count without pulling in what serves the figures (`admin`).

pub mod access_log;
pub mod logging;
pub mod metrics;
pub mod text;
