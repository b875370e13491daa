//! Corsair's sidecar: the set of compiled policies it enforces, swapped atomically, and the
//! sync client that keeps that set current from the control plane.
//!
//! # Layout
//! - [`policies`]: [`PolicySet`](policies::PolicySet), the `ArcSwap` of compiled policies a
//!   request reads once, and how a control-plane response is applied to it (all or nothing).
//! - [`origin_sets`]: origin sets as the control plane sends them (whole, or a delta
//!   checked against a digest), compiled once per process.
//! - [`admin`]: the admin listener: `/healthz`, `/readyz`, `/metrics`, `/policy`.
//! - [`metrics`]: Prometheus counters and gauges, and the rate limit on denial logs.
//! - [`cache_file`]: the last-known-good file, written atomically, read at start.
//! - [`policy_file`]: a watched local policy file as the source, without a control plane.
//! - [`sync`]: the reconnecting `DiscoveryService` client: resume, apply, ACK/NACK, backoff.
//! - [`background`]: the lower-priority thread that runs the sync client and the watchers.
//! - [`proxy`]: the hyper proxy that enforces the policy set in front of one upstream.
//! - [`listener`]: the accept loop's bounds: the connection limit, and backing off failed
//!   accepts.
//! - [`http1`]: HTTP/1 client connections that hold no buffers while idle.
//! - [`http2`]: HTTP/2 client connections' deadlines: the first request, and idleness.
//! - [`upstream`]: keep-alive HTTP/1.1 connections to the upstream and the exchanges on them.
//! - [`sim`]: a fleet of lightweight simulated sidecars, for load tests and benchmarks.

pub mod admin;
pub mod background;
pub mod cache_file;
pub mod http1;
pub mod http2;
pub mod listener;
pub mod metrics;
pub mod origin_sets;
pub mod policies;
pub mod policy_file;
pub mod proxy;
pub mod sim;
pub mod sync;
pub mod upstream;
