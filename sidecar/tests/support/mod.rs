//! What the sidecar's tests share: a [`Deadline`] for every wait, and [`skip`] for a test
//! this machine cannot run.

#![allow(dead_code, unreachable_pub, unused_imports)]

pub use corsair_testkit::{Deadline, PATIENCE, skip, within};
