//! Corsair's CORS policy: the model an operator writes, its validation and lint, and the
//! compiled engine that decides every request. Pure: no I/O, no async.
//!
//! ```
//! use corsair_policy::{CompiledPolicy, Policy, PolicySpec, Request};
//! use http::{HeaderMap, Method};
//!
//! let spec = PolicySpec {
//!     service: "shop".into(),
//!     allowed_origins: vec!["https://app.example.com".into()],
//!     allowed_methods: vec!["PUT".into()],
//!     ..PolicySpec::default()
//! };
//! let policy = Policy::check(&spec, &[] as &[&str]).unwrap().policy;
//! let engine = CompiledPolicy::new(policy);
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("origin", "https://app.example.com".parse().unwrap());
//! let decision = engine.decide(&Request::new(&Method::GET, &headers));
//! assert!(decision.allowed);
//! ```
//!
//! # Layout
//! - [`model`]: [`PolicySpec`] (input, with its [`RouteSpec`]s) and [`Policy`] (validated,
//!   canonical), [`Mode`].
//! - [`origin`]: the serialized-origin grammar and [`OriginPattern`], one parsed
//!   allowed-origin entry.
//! - [`origin_set`]: [`OriginSetSpec`] and [`OriginSet`], named origin lists that policies
//!   reference as `set:NAME`, validated and compiled once however many policies share them.
//! - [`lint`]: validation and lint, [`Finding`]s with field paths and stable [`Code`]s.
//! - [`route`]: per-route rules: canonical route paths, the readings of a request path, the
//!   route table.
//! - [`engine`]: [`CompiledPolicy`], [`Request`] in, [`Decision`] out.
//! - [`headers`]: [`CorsHeaders`], written into a response with `Vary` merged.

pub mod engine;
pub mod headers;
pub mod lint;
mod matcher;
pub mod model;
pub mod origin;
pub mod origin_set;
pub mod route;

pub use engine::{Action, CompiledPolicy, Decision, Kind, Reason, Request, is_same_origin};
pub use headers::{CorsHeaders, Vary};
pub use lint::{Code, Finding, Rejected, Severity, Validated, blocking, lint, lint_with_sets};
pub use model::{Mode, Policy, PolicySpec, RouteSpec};
pub use origin::{OriginPattern, Scheme};
pub use origin_set::{OriginSet, OriginSetSpec, SET_PREFIX, SetLookup, lint_set};
pub use route::RouteIndex;
