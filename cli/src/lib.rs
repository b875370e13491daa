//! `corsairctl`, the operator's tool for Corsair: declarative policies and origin sets from
//! files (apply, diff), history and rollback, explanations of single requests, the audit log
//! and the fleet's sync status; plus `quickstart`, the whole system on one machine.
//!
//! The binary's command line lives in `main.rs`; each command group is a module here.

pub mod audit;
pub mod client;
pub mod doc;
pub mod error;
pub mod fleet;
pub mod origin_set;
pub mod output;
pub mod policy;
pub mod quickstart;
pub mod token;
