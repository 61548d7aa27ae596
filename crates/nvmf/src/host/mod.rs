//! NVMe/TCP host: controllers connected to remote subsystems, with SPDK's
//! reconnect semantics, and namespaces usable as bdevs.
//!
//! Layers, pure core to thin shell:
//! - [`state`]: the controller lifecycle (SPDK's state names) as a checked table.
//! - [`queue`]: one queue's protocol state machine, fed bytes, giving PDUs to
//!   send and finished requests; no I/O, no allocation per command.
//! - [`tcp`]: sockets: TCP connect, ICReq/ICResp, Connect, and the loops that
//!   drive a [`queue::QueueCore`] (a tokio task per managed queue, or
//!   [`tcp::IoQpair`], a queue one task drives itself, for load generators).
//! - [`controller`]: [`HostController`]: bring-up, keep-alive, I/O submission
//!   from any thread, failure detection, reconnect, fast-I/O-fail, controller
//!   loss, graceful shutdown, and removal notification.
//! - [`bdev`]: [`NvmeNsBdev`], a remote namespace as a [`::bdev::Bdev`].

pub mod bdev;
pub mod controller;
pub mod queue;
pub mod state;
pub mod tcp;

use std::time::Duration;

use nvme_wire::Status;

pub use self::bdev::NvmeNsBdev;
pub use controller::{CtrlrSnapshot, HostController, NamespaceInfo, QueueInfo, Removal};
pub use state::CtrlrState;
pub use tcp::IoQpair;

use crate::TransportId;
use queue::{CmdError, QueueError};

/// Options of a host controller: where to connect, as whom, how many queues,
/// and SPDK's failure-handling knobs.
#[derive(Debug, Clone)]
pub struct ControllerOpts {
    pub trid: TransportId,
    /// Host NQN sent in Connect.
    pub hostnqn: String,
    /// Host identifier sent in Connect (16 bytes; a UUID).
    pub hostid: [u8; 16],
    /// I/O queues the controller opens and spreads submitted I/O over.
    pub num_io_queues: u16,
    /// Further queue ids to ask the target for, for [`HostController::alloc_io_qpair`].
    pub extra_io_qpairs: u16,
    /// Commands in flight per I/O queue (capped by the controller's CAP.MQES).
    pub io_queue_depth: u16,
    /// Commands in flight on the admin queue (Connect SQSIZE; 31 as Linux sends).
    pub admin_queue_depth: u16,
    /// Keep Alive Timeout asked for at Connect, in ms (0 = none). Keep Alive is
    /// sent every `kato_ms / 2`.
    pub kato_ms: u32,
    /// Ask for header digests.
    pub hdgst: bool,
    /// Ask for data digests.
    pub ddgst: bool,
    /// Bound of one queue's connect: TCP, ICReq/ICResp and the Connect command.
    pub connect_timeout: Duration,
    /// Bound of each admin command.
    pub admin_timeout: Duration,
    /// Bound of each I/O command in flight; one that expires resets the controller.
    pub io_timeout: Duration,
    /// SPDK: after the controller fails, keep trying to reconnect this long,
    /// then delete it (-1 = for ever, 0 = one reset attempt, then `failed`).
    pub ctrlr_loss_timeout_sec: i32,
    /// SPDK: delay between reconnect attempts.
    pub reconnect_delay_sec: u32,
    /// SPDK: after this long without a connection, fail held and new I/O (0 = never).
    pub fast_io_fail_timeout_sec: u32,
    /// How often an I/O that failed with a retryable status is resubmitted.
    pub io_retry_count: u8,
    /// Busy-poll an I/O queue's socket this long (µs) after sending, before
    /// sleeping in epoll: lower latency at low queue depth for CPU time
    /// (SPDK polls all the time). 0 = never.
    pub io_poll_us: u32,
}

impl ControllerOpts {
    /// Options with SPDK-like defaults and a fresh host identity.
    pub fn new(trid: TransportId) -> Self {
        let id = uuid::Uuid::new_v4();
        ControllerOpts {
            trid,
            hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{id}"),
            hostid: *id.as_bytes(),
            num_io_queues: 1,
            extra_io_qpairs: 0,
            io_queue_depth: 128,
            admin_queue_depth: 31,
            kato_ms: 10_000,
            hdgst: false,
            ddgst: false,
            connect_timeout: Duration::from_secs(10),
            admin_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            io_retry_count: 3,
            io_poll_us: 0,
        }
    }

    /// Checks the options the way SPDK's `bdev_nvme_check_io_error_resiliency_params`
    /// does (reconnect_delay ≤ fast_io_fail ≤ ctrlr_loss when set), plus sanity.
    pub fn validate(&self) -> Result<(), OptsError> {
        let (loss, delay, fail) = (
            self.ctrlr_loss_timeout_sec,
            self.reconnect_delay_sec,
            self.fast_io_fail_timeout_sec,
        );
        if loss < -1 {
            return Err(OptsError::CtrlrLossBelowMinusOne);
        } else if loss == -1 {
            if delay == 0 {
                return Err(OptsError::ReconnectDelayZero);
            } else if fail != 0 && fail < delay {
                return Err(OptsError::ReconnectDelayAboveFastIoFail);
            }
        } else if loss != 0 {
            if delay == 0 {
                return Err(OptsError::ReconnectDelayZero);
            } else if delay > loss as u32 {
                return Err(OptsError::ReconnectDelayAboveCtrlrLoss);
            } else if fail != 0 {
                if fail < delay {
                    return Err(OptsError::ReconnectDelayAboveFastIoFail);
                } else if fail > loss as u32 {
                    return Err(OptsError::FastIoFailAboveCtrlrLoss);
                }
            }
        } else if delay != 0 || fail != 0 {
            return Err(OptsError::KnobsWithoutCtrlrLoss);
        }
        if self.hostnqn.is_empty() || self.hostnqn.len() > 223 {
            return Err(OptsError::BadNqn("hostnqn"));
        }
        if self.trid.subnqn.is_empty() || self.trid.subnqn.len() > 223 {
            return Err(OptsError::BadNqn("subnqn"));
        }
        if self.io_queue_depth < 2 {
            return Err(OptsError::QueueDepth(self.io_queue_depth));
        }
        if self.admin_queue_depth < 4 {
            return Err(OptsError::QueueDepth(self.admin_queue_depth));
        }
        if self.num_io_queues as u32 + self.extra_io_qpairs as u32 > 0xFFFE {
            return Err(OptsError::TooManyQueues);
        }
        Ok(())
    }
}

/// Options SPDK (or NVMe) rejects. The messages are SPDK's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptsError {
    #[error("ctrlr_loss_timeout_sec can't be less than -1")]
    CtrlrLossBelowMinusOne,
    #[error("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0")]
    ReconnectDelayZero,
    #[error("reconnect_delay_sec can't be more than fast_io_fail_timeout_sec")]
    ReconnectDelayAboveFastIoFail,
    #[error("reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec")]
    ReconnectDelayAboveCtrlrLoss,
    #[error("fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec")]
    FastIoFailAboveCtrlrLoss,
    #[error("Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 if ctrlr_loss_timeout_sec is 0")]
    KnobsWithoutCtrlrLoss,
    #[error("{0} must be 1..=223 bytes")]
    BadNqn(&'static str),
    #[error("queue depth {0} is too small")]
    QueueDepth(u16),
    #[error("too many I/O queues")]
    TooManyQueues,
}

impl OptsError {
    /// The JSON-RPC error code SPDK answers with (-EINVAL).
    pub fn errno(&self) -> i32 {
        -libc::EINVAL
    }
}

/// Why a host operation failed; every variant names the controller's transport ID.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("controller {trid}: invalid options: {source}")]
    Opts {
        trid: TransportId,
        #[source]
        source: OptsError,
    },
    #[error("controller {trid}: qid {qid}: TCP connect failed: {source}")]
    Connect {
        trid: TransportId,
        qid: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("controller {trid}: qid {qid}: connection setup failed: {reason}")]
    Handshake {
        trid: TransportId,
        qid: u16,
        reason: String,
    },
    #[error("controller {trid}: {cmd} failed: {status}")]
    Status {
        trid: TransportId,
        cmd: &'static str,
        status: Status,
    },
    #[error("controller {trid}: {cmd} failed: {source}")]
    Cmd {
        trid: TransportId,
        cmd: &'static str,
        #[source]
        source: CmdError,
    },
    #[error("controller {trid}: {what} timed out after {after:?}")]
    Timeout {
        trid: TransportId,
        what: String,
        after: Duration,
    },
    #[error("controller {trid}: {source}")]
    Queue {
        trid: TransportId,
        #[source]
        source: Box<QueueError>,
    },
    #[error("controller {trid}: qid {qid}: socket error: {source}")]
    Io {
        trid: TransportId,
        qid: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("controller {trid}: qid {qid}: connection closed by the controller")]
    Closed { trid: TransportId, qid: u16 },
    #[error("controller {trid}: is {state}")]
    State {
        trid: TransportId,
        state: CtrlrState,
    },
    #[error("controller {trid}: {what}")]
    Unsupported { trid: TransportId, what: String },
}

impl HostError {
    /// The transport ID of the controller the error is about.
    pub fn trid(&self) -> &TransportId {
        match self {
            HostError::Opts { trid, .. }
            | HostError::Connect { trid, .. }
            | HostError::Handshake { trid, .. }
            | HostError::Status { trid, .. }
            | HostError::Cmd { trid, .. }
            | HostError::Timeout { trid, .. }
            | HostError::Queue { trid, .. }
            | HostError::Io { trid, .. }
            | HostError::Closed { trid, .. }
            | HostError::State { trid, .. }
            | HostError::Unsupported { trid, .. } => trid,
        }
    }
    /// Whether trying again later may succeed (the peer or the path may come
    /// back); false for configuration errors and DNR statuses.
    pub fn is_transient(&self) -> bool {
        match self {
            HostError::Opts { .. } | HostError::Unsupported { .. } => false,
            HostError::Status { status, .. } => !status.dnr,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(loss: i32, delay: u32, fail: u32) -> ControllerOpts {
        let mut o = ControllerOpts::new(TransportId::new("127.0.0.1", "4420", "nqn.x:y"));
        o.ctrlr_loss_timeout_sec = loss;
        o.reconnect_delay_sec = delay;
        o.fast_io_fail_timeout_sec = fail;
        o
    }

    #[test]
    fn validates_knobs_like_spdk() {
        use OptsError::*;
        let cases: &[(i32, u32, u32, Option<OptsError>)] = &[
            (0, 0, 0, None),
            (-1, 1, 0, None),
            (-1, 2, 5, None),
            (15, 2, 10, None), // Longhorn's
            (10, 10, 10, None),
            (10, 2, 0, None),
            (-2, 1, 0, Some(CtrlrLossBelowMinusOne)),
            (-1, 0, 0, Some(ReconnectDelayZero)),
            (-1, 5, 2, Some(ReconnectDelayAboveFastIoFail)),
            (10, 0, 0, Some(ReconnectDelayZero)),
            (10, 11, 0, Some(ReconnectDelayAboveCtrlrLoss)),
            (10, 5, 2, Some(ReconnectDelayAboveFastIoFail)),
            (10, 2, 11, Some(FastIoFailAboveCtrlrLoss)),
            (0, 1, 0, Some(KnobsWithoutCtrlrLoss)),
            (0, 0, 1, Some(KnobsWithoutCtrlrLoss)),
        ];
        for &(l, d, f, ref want) in cases {
            assert_eq!(
                opts(l, d, f).validate().err(),
                *want,
                "loss {l} delay {d} fail {f}"
            );
        }
        assert_eq!(KnobsWithoutCtrlrLoss.errno(), -22);
    }

    #[test]
    fn validates_identity_and_sizes() {
        let mut o = opts(0, 0, 0);
        assert!(o.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
        o.hostnqn.clear();
        assert_eq!(o.validate(), Err(OptsError::BadNqn("hostnqn")));
        let mut o = opts(0, 0, 0);
        o.io_queue_depth = 1;
        assert_eq!(o.validate(), Err(OptsError::QueueDepth(1)));
    }
}
