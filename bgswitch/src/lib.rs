//! bgswitch: a kernel-level blue/green traffic switcher.
//!
//! Layers, each knowing only those below it:
//! [`config`] → [`model`] (pure rules) → [`dataplane`] (aya) and [`state`]
//! (durable desired state) → [`daemon`] (the event loop) and [`api`] (the
//! socket protocol) → [`cli`].

pub mod api;
pub mod checks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod paths;
pub mod simulate;
pub mod state;
pub mod top;
