//! The balancer as a library: the `balancer` command is [`cli::main_with`]
//! with the built-in extension kinds (Lua scripts), and a program of your
//! own is the same call with yours (see [`extension`]). Reading order: `cli` (the command line) ->
//! `server` (wiring the services) -> `proxy` (the request path, hook by
//! hook) -> `routing` and `upstream` (where a request goes) -> `cache`.
//! A configuration file becomes a [`runtime::Snapshot`] once per load; the
//! request path reads only that, and `runtime` keeps it current.
//!
//! - `telemetry`: the access log, the process log's levels, per-request metrics;
//! - `config`: the TOML file's types, validation and the diff of two files;
//! - `tls`: certificates for the TLS listener, ACME orders;
//! - `upstream`: backends, DNS discovery, health probes, selection;
//! - `routing`: routes, header rewriting, rate limits, request ids;
//! - `cache`: what is cached and where;
//! - `extension`: the hooks a program of your own brings;
//! - `runtime`: the compiled snapshot every request reads, and the loops
//!   that keep it current (reload, upkeep of the pools, certificates);
//! - `proxy`: Pingora's hooks, client limits, connections, graceful stop;
//! - `admin`: status page, metrics endpoint, PURGE;
//! - `server`: the services wired together; `cli`: the command line.
//!
//! The modules are in layers, bottom to top, and a module uses only modules
//! of the layers below its own (`tests/layers.rs` checks it against this list):
//!
//! 0. `telemetry`: logging and counting, which every layer may do, needs nothing else.
//! 1. `config`: what the file says, before anything acts on it.
//! 2. `tls`, `upstream`, `routing`, `cache`, `extension`: each one thing the file configures, apart.
//! 3. `runtime`: one snapshot of all of them, and the loops that keep it current.
//! 4. `proxy`: requests, served from the snapshot in force.
//! 5. `admin`: what the operator sees of all the above, the proxy's counts included.
//! 6. `server`: every service started and stopped together.
//! 7. `cli`: the command line, the one way in.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod extension;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
