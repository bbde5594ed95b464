//! The balancer as a library: every part of the request path and its upkeep,
//! so that the `balancer` command wires them and the fuzz targets and tests
//! can reach them. Each module says what it owns.

pub mod access_log;
pub mod admin;
pub mod cache;
pub mod config;
pub mod connections;
pub mod discovery;
pub mod drain;
pub mod forwarded;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod upkeep;
pub mod upstream;
