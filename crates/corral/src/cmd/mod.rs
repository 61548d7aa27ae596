//! Subcommands.

pub mod target;
