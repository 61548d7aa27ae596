//! Subcommands.

pub mod dataplane;
pub mod target;
