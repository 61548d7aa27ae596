//! Subcommands.

pub mod dataplane;
pub mod rpc;
pub mod target;
