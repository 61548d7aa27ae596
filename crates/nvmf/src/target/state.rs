//! The controller's enable/shutdown state machine, driven by host writes of CC
//! through Property Set and by keep-alive expiry.
//!
//! | state            | CSTS.RDY | CSTS.SHST | CSTS.CFS |
//! |------------------|----------|-----------|----------|
//! | Disabled         | 0        | 0         | 0        |
//! | Enabled          | 1        | 0         | 0        |
//! | ShutdownComplete | RDY kept | 2         | 0        |
//! | Fatal            | RDY kept | kept      | 1        |

use nvme_wire::fabrics::{Cc, Csts};

/// Where a target-side controller is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtrlState {
    /// CC.EN = 0: only fabrics commands are accepted.
    Disabled,
    /// CC.EN = 1 and CSTS.RDY = 1: admin and I/O commands are accepted.
    Enabled,
    /// A shutdown notification was processed (CSTS.SHST = complete).
    ShutdownComplete,
    /// Keep-alive expired or an unrecoverable error: every queue is being torn down.
    Fatal,
}

/// The side effects a legal transition asks the owner to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The controller was reset or shut down: its I/O queues must be closed.
    DropIoQueues,
}

/// A CC write or an event that is not legal in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("controller state {from:?}: illegal move to {to:?}")]
pub struct IllegalTransition {
    pub from: CtrlState,
    pub to: CtrlState,
}

impl CtrlState {
    /// Whether moving from `self` to `next` is allowed.
    pub fn can_move_to(self, next: CtrlState) -> bool {
        use CtrlState::*;
        matches!(
            (self, next),
            (Disabled, Enabled)
                | (Enabled, Disabled)
                | (Enabled, ShutdownComplete)
                | (Disabled, ShutdownComplete)
                | (ShutdownComplete, Disabled)
                | (ShutdownComplete, ShutdownComplete)
                | (Disabled, Disabled)
                | (Enabled, Enabled)
                | (Disabled | Enabled | ShutdownComplete, Fatal)
                | (Fatal, Fatal)
        )
    }

    /// The state a write of `new` to CC leads to, given the previous CC value.
    /// Writes that change nothing keep the state.
    pub fn on_cc_write(self, old: Cc, new: Cc) -> Result<(CtrlState, Effect), IllegalTransition> {
        use CtrlState::*;
        let next = if self == Fatal {
            Fatal
        } else if new.shn != 0 && old.shn == 0 {
            ShutdownComplete
        } else if new.en && !old.en {
            Enabled
        } else if !new.en && (old.en || self == ShutdownComplete) {
            Disabled
        } else {
            self
        };
        if !self.can_move_to(next) {
            return Err(IllegalTransition {
                from: self,
                to: next,
            });
        }
        let effect = match (self, next) {
            (Enabled, Disabled) | (Enabled, ShutdownComplete) => Effect::DropIoQueues,
            _ => Effect::None,
        };
        Ok((next, effect))
    }

    /// CSTS as the host reads it in this state.
    pub fn csts(self, was_ready: bool) -> Csts {
        match self {
            CtrlState::Disabled => Csts {
                rdy: false,
                cfs: false,
                shst: 0,
            },
            CtrlState::Enabled => Csts {
                rdy: true,
                cfs: false,
                shst: 0,
            },
            CtrlState::ShutdownComplete => Csts {
                rdy: was_ready,
                cfs: false,
                shst: 2,
            },
            CtrlState::Fatal => Csts {
                rdy: was_ready,
                cfs: true,
                shst: 0,
            },
        }
    }

    /// Whether admin (non-fabrics) and I/O commands may run.
    pub fn accepts_commands(self) -> bool {
        self == CtrlState::Enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CtrlState::*;

    fn cc(en: bool, shn: u8) -> Cc {
        Cc {
            en,
            shn,
            iosqes: 6,
            iocqes: 4,
            ..Default::default()
        }
    }

    #[test]
    fn enable_disable_shutdown() {
        assert_eq!(
            Disabled.on_cc_write(cc(false, 0), cc(true, 0)),
            Ok((Enabled, Effect::None))
        );
        assert_eq!(
            Enabled.on_cc_write(cc(true, 0), cc(false, 0)),
            Ok((Disabled, Effect::DropIoQueues))
        );
        assert_eq!(
            Enabled.on_cc_write(cc(true, 0), cc(true, 1)),
            Ok((ShutdownComplete, Effect::DropIoQueues))
        );
        assert_eq!(
            ShutdownComplete.on_cc_write(cc(true, 1), cc(false, 0)),
            Ok((Disabled, Effect::None))
        );
        assert_eq!(
            Disabled.on_cc_write(cc(false, 0), cc(false, 1)).unwrap().0,
            ShutdownComplete
        );
    }

    #[test]
    fn illegal_moves_are_rejected() {
        // Enabling straight out of shutdown, without a reset first.
        let r = ShutdownComplete.on_cc_write(cc(false, 1), cc(true, 1));
        assert_eq!(
            r,
            Err(IllegalTransition {
                from: ShutdownComplete,
                to: Enabled
            })
        );
        assert!(!Fatal.can_move_to(Enabled));
        assert!(!Fatal.can_move_to(Disabled));
        assert_eq!(
            Fatal.on_cc_write(cc(true, 0), cc(false, 0)),
            Ok((Fatal, Effect::None))
        );
    }

    #[test]
    fn table_walk() {
        let all = [Disabled, Enabled, ShutdownComplete, Fatal];
        for a in all {
            assert!(a.can_move_to(Fatal) || a == Fatal);
            for b in all {
                if a == Fatal && b != Fatal {
                    assert!(!a.can_move_to(b));
                }
            }
        }
        assert!(Enabled.csts(true).rdy);
        assert!(Fatal.csts(true).cfs);
        assert_eq!(ShutdownComplete.csts(true).shst, 2);
    }
}
