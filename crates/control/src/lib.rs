//! corral's agent (instance manager) and manager (control plane). See docs/CONTROL.md.

pub mod agent;
pub mod agent_http;
pub mod api;
pub mod converge;
pub mod dp;
pub mod manager;
pub mod manager_http;
pub mod model;
pub mod naming;
pub mod placement;
pub mod rebuild;
pub mod retry;
pub mod store;
