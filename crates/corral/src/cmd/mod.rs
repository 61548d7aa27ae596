//! Subcommands.

pub mod agent;
pub mod bench;
pub mod client;
pub mod ctl;
pub mod dataplane;
pub mod events;
pub mod manager;
pub mod output;
pub mod rpc;
pub mod target;
pub mod up;
