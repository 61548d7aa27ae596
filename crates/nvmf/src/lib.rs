//! NVMe over TCP: a target that serves bdevs as namespaces of subsystems, and a
//! host that connects controllers to remote subsystems.
//!
//! Both sides keep protocol logic in plain state machines fed with bytes and
//! events (`target::conn`, `host::queue`); the `tcp` modules own the sockets and
//! timers and drive them. See DESIGN.md ("NVMe/TCP").

pub mod host;
pub mod status_map;
pub mod target;
pub mod trid;

pub use trid::TransportId;
