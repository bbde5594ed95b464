//! The balancer as a library: the `balancer` command is [`cli::main_with`]
//! with the built-in extension kinds (Lua scripts), and a program of your
//! own is the same call with yours (see [`extension`]). Reading order: `cli` (the command line) ->
//! `server` (wiring the services) -> `proxy` (the request path, hook by
//! hook) -> `routing` and `upstream` (where a request goes) -> `cache`.
//! A configuration file becomes a [`runtime::Snapshot`] once per load; the
//! request path reads only that.
//!
//! - `config`: the TOML file's types, validation and live reload;
//! - `runtime`: the compiled snapshot every request reads;
//! - `upstream`: backends, DNS discovery, health checks, selection;
//! - `routing`: routes, header rewriting, rate limits, request ids;
//! - `proxy`: Pingora's hooks, client limits, connections, graceful stop;
//! - `cache`: what is cached and where;
//! - `admin`: status page, metrics, access log, the process log.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod extension;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod upstream;
