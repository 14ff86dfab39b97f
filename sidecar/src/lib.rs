//! forkscope-sidecar: the pod-local companion of forkscope-server (and of plain gunicorn).
//!
//! It finds leaders and workers through `/proc`, reports their memory (PSS, RSS, USS, shared,
//! swap) over a JSON API and as Prometheus metrics, drives profile sessions through the
//! runtime-directory contract of [`forkscope_protocol`] (command file + `SIGUSR2` doorbell +
//! result files), and manages the leader with signals. The operator talks to it through the
//! types in [`api`] and the [`client::Client`] exported here.
//!
//! # Layout
//! - [`api`]: the `/v1` request and response types (shared with the operator).
//! - [`client`]: typed async client.
//! - [`discovery`]: `/proc` scan, roles from titles, PID-reuse-safe identity.
//! - [`memory`]: `smaps_rollup` (or `smaps`) reading.
//! - [`sessions`]: profile sessions, their journal and orphan recovery.
//! - [`summary`]: aggregation of heap diffs across workers.
//! - [`signals`]: signals only to discovered processes, through pidfds.
//! - [`leader`]: reload, reopen logs, worker count.
//! - [`metrics`]: the Prometheus registry and the scrape-time `/proc` collector.
//! - [`auth`]: the bearer-token check.
//! - [`http_server`]: the HTTP server's limits and bounded graceful stop.
//! - [`hardening`]: the process made non-dumpable.
//! - [`routes`], [`error`], [`openapi`], [`paths`]: the HTTP surface (every route path is in
//!   [`paths`]).
//!
//! # Features
//! `service` (default) builds the sidecar itself. Without it the crate is [`api`], [`client`],
//! [`paths`] and [`openapi`] only, so a caller (the operator) links neither axum, procfs nor prometheus:
//! `forkscope-sidecar = { default-features = false }`.
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod openapi;
pub mod paths;

pub use client::{Client, ClientError};

#[cfg(feature = "service")]
pub mod auth;
#[cfg(feature = "service")]
pub mod discovery;
#[cfg(feature = "service")]
pub mod error;
#[cfg(feature = "service")]
pub mod hardening;
#[cfg(feature = "service")]
pub mod http_server;
#[cfg(feature = "service")]
pub mod leader;
#[cfg(feature = "service")]
pub mod memory;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod recycles;
#[cfg(feature = "service")]
pub mod request_metrics;
#[cfg(feature = "service")]
pub mod routes;
#[cfg(feature = "service")]
pub mod sessions;
#[cfg(feature = "service")]
pub mod signals;
#[cfg(feature = "service")]
pub mod summary;

#[cfg(feature = "service")]
mod service;
#[cfg(feature = "service")]
pub use service::{AppState, Config, app, serve};
