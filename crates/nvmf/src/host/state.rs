//! The host controller's lifecycle as data: SPDK's state names, one function
//! that decides which moves are legal, and tests that walk the whole table.
//!
//! Only the controller's supervisor moves the state (through
//! [`CtrlrState::check_move`]); everyone else reads it or subscribes to it.

use serde::Serialize;

/// State of a host controller, named as SPDK's `bdev_nvme_get_controllers` names
/// them (plus `connecting` for the first bring-up and `deleted` for the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtrlrState {
    /// First bring-up in progress; no I/O accepted yet.
    Connecting,
    /// Connected: admin and I/O queues up, keep-alive running.
    Enabled,
    /// The connection was lost (or a reset was asked for); a reconnect attempt is running.
    Resetting,
    /// The last reconnect attempt failed; the next one starts after `reconnect_delay_sec`.
    ReconnectIsDelayed,
    /// The reset failed and no further attempt will be made (`ctrlr_loss_timeout_sec`
    /// = 0). I/O fails; the controller stays until it is deleted or reset by hand.
    Failed,
    /// Being torn down (user delete, or `ctrlr_loss_timeout_sec` expired).
    Deleting,
    /// Gone: every queue is closed and consumers have been told.
    Deleted,
}

impl CtrlrState {
    /// Every state, for table walks.
    pub const ALL: [CtrlrState; 7] = [
        CtrlrState::Connecting,
        CtrlrState::Enabled,
        CtrlrState::Resetting,
        CtrlrState::ReconnectIsDelayed,
        CtrlrState::Failed,
        CtrlrState::Deleting,
        CtrlrState::Deleted,
    ];

    /// SPDK's spelling, as `bdev_nvme_get_controllers` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            CtrlrState::Connecting => "connecting",
            CtrlrState::Enabled => "enabled",
            CtrlrState::Resetting => "resetting",
            CtrlrState::ReconnectIsDelayed => "reconnect_is_delayed",
            CtrlrState::Failed => "failed",
            CtrlrState::Deleting => "deleting",
            CtrlrState::Deleted => "deleted",
        }
    }

    /// Whether the controller can move from `self` to `next`.
    pub fn can_move_to(self, next: CtrlrState) -> bool {
        use CtrlrState::*;
        matches!(
            (self, next),
            (Connecting, Enabled)
                | (Connecting, Deleting)
                | (Enabled, Resetting)
                | (Enabled, Deleting)
                | (Resetting, Enabled)
                | (Resetting, ReconnectIsDelayed)
                | (Resetting, Failed)
                | (Resetting, Deleting)
                | (ReconnectIsDelayed, Resetting)
                | (ReconnectIsDelayed, Deleting)
                | (Failed, Resetting)
                | (Failed, Deleting)
                | (Deleting, Deleted)
        )
    }

    /// `Ok(next)` if the move is legal, else an error naming both states.
    pub fn check_move(self, next: CtrlrState) -> Result<CtrlrState, IllegalMove> {
        if self.can_move_to(next) {
            Ok(next)
        } else {
            Err(IllegalMove {
                from: self,
                to: next,
            })
        }
    }

    /// Whether I/O submitted now can eventually be served (it is sent, or held
    /// for a reconnect) rather than failed at once. Fast-I/O-fail is decided by
    /// the controller, not by the state alone.
    pub fn may_serve_io(self) -> bool {
        matches!(
            self,
            CtrlrState::Enabled | CtrlrState::Resetting | CtrlrState::ReconnectIsDelayed
        )
    }

    /// Whether the controller is gone or going.
    pub fn is_terminal(self) -> bool {
        matches!(self, CtrlrState::Deleting | CtrlrState::Deleted)
    }
}

impl std::fmt::Display for CtrlrState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change the table forbids: a bug in the supervisor, reported rather
/// than silently applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal controller state change {from} -> {to}")]
pub struct IllegalMove {
    pub from: CtrlrState,
    pub to: CtrlrState,
}

#[cfg(test)]
mod tests {
    use super::CtrlrState::*;
    use super::*;

    /// The whole table, written out once more by hand: every pair not listed is illegal.
    const LEGAL: &[(CtrlrState, CtrlrState)] = &[
        (Connecting, Enabled),
        (Connecting, Deleting),
        (Enabled, Resetting),
        (Enabled, Deleting),
        (Resetting, Enabled),
        (Resetting, ReconnectIsDelayed),
        (Resetting, Failed),
        (Resetting, Deleting),
        (ReconnectIsDelayed, Resetting),
        (ReconnectIsDelayed, Deleting),
        (Failed, Resetting),
        (Failed, Deleting),
        (Deleting, Deleted),
    ];

    #[test]
    fn walks_the_whole_table() {
        for from in CtrlrState::ALL {
            for to in CtrlrState::ALL {
                let want = LEGAL.contains(&(from, to));
                assert_eq!(from.can_move_to(to), want, "{from} -> {to}");
                assert_eq!(from.check_move(to).is_ok(), want, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn deleted_is_final_and_every_live_state_can_be_deleted() {
        for s in CtrlrState::ALL {
            assert!(!Deleted.can_move_to(s));
            if !s.is_terminal() {
                assert!(s.can_move_to(Deleting), "{s} must be deletable");
            }
        }
        assert!(!Deleting.can_move_to(Deleting));
    }

    #[test]
    fn reconnect_cycle_and_failure_paths() {
        // lost connection, two failed attempts, then success
        let mut s = Enabled;
        for next in [
            Resetting,
            ReconnectIsDelayed,
            Resetting,
            ReconnectIsDelayed,
            Resetting,
            Enabled,
        ] {
            s = s.check_move(next).unwrap();
        }
        // ctrlr_loss_timeout_sec = 0: one attempt, then failed; a manual reset may follow
        let s = s
            .check_move(Resetting)
            .and_then(|s| s.check_move(Failed))
            .unwrap();
        assert_eq!(s.check_move(Resetting), Ok(Resetting));
        // a delayed reconnect cannot jump straight back to enabled
        assert_eq!(
            ReconnectIsDelayed.check_move(Enabled),
            Err(IllegalMove {
                from: ReconnectIsDelayed,
                to: Enabled
            })
        );
        assert!(!Failed.can_move_to(Enabled));
    }

    #[test]
    fn names_are_spdks() {
        assert_eq!(ReconnectIsDelayed.as_str(), "reconnect_is_delayed");
        assert_eq!(Enabled.to_string(), "enabled");
    }
}
