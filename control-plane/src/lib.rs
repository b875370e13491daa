//! Corsair's control plane: it keeps every service's CORS policy in a database (SQLite by
//! default, PostgreSQL for several replicas), serves the `corsair.v1` gRPC API, and records
//! every change, and every refused change, in a hash-chained audit log.
//!
//! # Layout
//! - [`store`]: the [`Store`](store::Store) trait, its SQLite and PostgreSQL implementations,
//!   and the one write algorithm both share.
//! - [`audit`]: the audit chain's hashing and verification.
//! - [`service`]: the gRPC services (`PolicyService`, `AuditService`, `DiscoveryService`,
//!   `FleetService`).
//! - [`cache`]: the live policies every discovery stream reads, kept current from the store.
//! - [`metrics`]: Prometheus metrics and their `/metrics` listener.
//! - [`convert`]: wire ↔ domain conversions and resource names.
//! - [`status`]: the error model, every refusal as a status with its details.
//! - [`page_token`]: signed, opaque page tokens bound to their listing and filter.
//! - [`listener`]: accepting connections within a cap, with a first-byte deadline and
//!   backoff on accept errors.
//! - [`server`]: assembles services, health and reflection on a listener, and shuts down
//!   gracefully.

pub mod audit;
pub mod auth;
pub mod cache;
pub mod convert;
pub mod listener;
pub mod metrics;
pub mod page_token;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod tls;
