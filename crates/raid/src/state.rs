//! The lifecycles of a raid and of its member slots, as checked tables.
//!
//! Callers never assign a state: they ask [`MemberState::can_move_to`] /
//! [`RaidState::can_move_to`] through the `move_to` helpers, which refuse
//! illegal moves, so a bug shows up as an error and a log line instead of a
//! member silently coming back into the mirror.

use serde::{Deserialize, Serialize};

/// Why a member left the mirror, which decides whether it may ever be a source
/// of truth again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveKind {
    /// It left while the raid kept acknowledging writes without it: it misses
    /// writes from then on and is never read again until rebuilt (I5).
    OutOfSync,
    /// It was the last in-sync member and the raid went offline with it: it
    /// holds every acknowledged write and stays a source of truth.
    LastInSync,
}

/// How and when a member left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub kind: LeaveKind,
    /// For a person: what failed ("write failed: no path to the device", "hot-removed", ...).
    pub reason: String,
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

/// The state of one member slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberState {
    /// No member (a slot freed and never filled, or not yet filled).
    Empty,
    /// In sync: receives writes, serves reads.
    Online,
    /// Being filled from the in-sync members: receives every new write, serves no reads.
    Rebuilding,
    /// Taken out of the I/O path; waiting for its in-flight I/O to finish
    /// before its claim is released.
    Removing(Departure),
    /// Gone: out of the I/O path, claim released, slot reusable.
    Removed(Departure),
}

/// An illegal state change, refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal {what} state change: {from} -> {to}")]
pub struct IllegalMove {
    pub what: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

impl MemberState {
    /// Whether `self -> next` is a legal move.
    ///
    /// - `Empty -> Online`: a member given at create that is (per the record) in sync.
    /// - `Empty -> Removed`: a member given at create that the record says is out of
    ///   sync; it keeps a slot so status shows it, but gets no I/O.
    /// - `Empty | Removed -> Rebuilding`: `bdev_raid_add_base_bdev`.
    /// - `Rebuilding -> Online`: the rebuild finished (and was made durable).
    /// - `Online | Rebuilding -> Removing`: an I/O error, a hot-remove, an explicit
    ///   removal, or the raid going offline.
    /// - `Removing -> Removed`: its in-flight I/O drained.
    ///
    /// Never `Removed -> Online` nor `Removing -> Online`: a member that left comes
    /// back only through a rebuild.
    pub fn can_move_to(&self, next: &MemberState) -> bool {
        use MemberState::*;
        matches!(
            (self, next),
            (Empty, Online)
                | (Empty, Removed(_))
                | (Empty | Removed(_), Rebuilding)
                | (Rebuilding, Online)
                | (Online | Rebuilding, Removing(_))
                | (Removing(_), Removed(_))
        )
    }

    /// Moves to `next` if legal.
    pub fn move_to(&mut self, next: MemberState) -> Result<(), IllegalMove> {
        if self.can_move_to(&next) {
            *self = next;
            Ok(())
        } else {
            Err(IllegalMove {
                what: "member",
                from: self.name(),
                to: next.name(),
            })
        }
    }

    /// Short name, as status reports it.
    pub fn name(&self) -> &'static str {
        match self {
            MemberState::Empty => "empty",
            MemberState::Online => "online",
            MemberState::Rebuilding => "rebuilding",
            MemberState::Removing(d) | MemberState::Removed(d) => match d.kind {
                LeaveKind::OutOfSync => "out_of_sync",
                LeaveKind::LastInSync => "offline",
            },
        }
    }

    /// Receives writes.
    pub fn is_writable(&self) -> bool {
        matches!(self, MemberState::Online | MemberState::Rebuilding)
    }

    /// Holds every acknowledged write (may serve reads once enabled).
    pub fn is_in_sync(&self) -> bool {
        matches!(self, MemberState::Online)
    }

    /// How it left, if it did.
    pub fn departure(&self) -> Option<&Departure> {
        match self {
            MemberState::Removing(d) | MemberState::Removed(d) => Some(d),
            _ => None,
        }
    }

    /// Whether a new member may take the slot.
    pub fn is_free(&self) -> bool {
        matches!(self, MemberState::Empty | MemberState::Removed(_))
    }
}

/// The state of a raid, with SPDK's names (`bdev_raid_get_bdevs` categories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RaidState {
    /// Being put together (create has not finished).
    Configuring,
    /// Serving I/O (possibly degraded).
    Online,
    /// No in-sync member is left, or the raid is being deleted: I/O fails with
    /// `Removed`; the bdev was hot-removed from the registry.
    Offline,
}

impl RaidState {
    /// Legal moves: `Configuring -> Online | Offline`, `Online -> Offline`.
    /// An offline raid never comes back; it is deleted and created again.
    pub fn can_move_to(&self, next: &RaidState) -> bool {
        use RaidState::*;
        matches!(
            (self, next),
            (Configuring, Online) | (Configuring, Offline) | (Online, Offline)
        )
    }

    /// Moves to `next` if legal.
    pub fn move_to(&mut self, next: RaidState) -> Result<(), IllegalMove> {
        if self.can_move_to(&next) {
            *self = next;
            Ok(())
        } else {
            Err(IllegalMove {
                what: "raid",
                from: self.name(),
                to: next.name(),
            })
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            RaidState::Configuring => "configuring",
            RaidState::Online => "online",
            RaidState::Offline => "offline",
        }
    }

    /// Parses a `bdev_raid_get_bdevs` category (`all` is handled by the caller).
    pub fn parse(s: &str) -> Option<RaidState> {
        match s {
            "configuring" => Some(RaidState::Configuring),
            "online" => Some(RaidState::Online),
            "offline" => Some(RaidState::Offline),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(kind: LeaveKind) -> Departure {
        Departure {
            kind,
            reason: "test".into(),
            at_ms: 1,
        }
    }

    fn all_members() -> Vec<MemberState> {
        vec![
            MemberState::Empty,
            MemberState::Online,
            MemberState::Rebuilding,
            MemberState::Removing(dep(LeaveKind::OutOfSync)),
            MemberState::Removing(dep(LeaveKind::LastInSync)),
            MemberState::Removed(dep(LeaveKind::OutOfSync)),
            MemberState::Removed(dep(LeaveKind::LastInSync)),
        ]
    }

    #[test]
    fn member_table_is_exactly_the_documented_one() {
        use MemberState::*;
        let legal = |a: &MemberState, b: &MemberState| -> bool {
            matches!(
                (a, b),
                (Empty, Online)
                    | (Empty, Removed(_))
                    | (Empty, Rebuilding)
                    | (Removed(_), Rebuilding)
                    | (Rebuilding, Online)
                    | (Online, Removing(_))
                    | (Rebuilding, Removing(_))
                    | (Removing(_), Removed(_))
            )
        };
        let mut n_legal = 0;
        for a in all_members() {
            for b in all_members() {
                assert_eq!(a.can_move_to(&b), legal(&a, &b), "{a:?} -> {b:?}");
                let mut s = a.clone();
                let r = s.move_to(b.clone());
                if legal(&a, &b) {
                    n_legal += 1;
                    assert!(r.is_ok());
                    assert_eq!(s, b);
                } else {
                    assert!(r.is_err(), "{a:?} -> {b:?} must be refused");
                    assert_eq!(s, a, "a refused move leaves the state alone");
                }
            }
        }
        assert_eq!(n_legal, 1 + 2 + 1 + 2 + 1 + 2 + 2 + 4);
    }

    #[test]
    fn a_member_that_left_never_comes_back_without_rebuild() {
        for kind in [LeaveKind::OutOfSync, LeaveKind::LastInSync] {
            let mut s = MemberState::Online;
            s.move_to(MemberState::Removing(dep(kind))).unwrap();
            assert!(s.move_to(MemberState::Online).is_err());
            s.move_to(MemberState::Removed(dep(kind))).unwrap();
            let e = s.clone().move_to(MemberState::Online).unwrap_err();
            assert_eq!(e.to, "online");
            assert!(!s.is_writable() && !s.is_in_sync() && s.is_free());
            s.move_to(MemberState::Rebuilding).unwrap();
            assert!(s.is_writable() && !s.is_in_sync());
            s.move_to(MemberState::Online).unwrap();
            assert!(s.is_in_sync());
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            MemberState::Removing(dep(LeaveKind::OutOfSync)).name(),
            "out_of_sync"
        );
        assert_eq!(
            MemberState::Removed(dep(LeaveKind::LastInSync)).name(),
            "offline"
        );
        assert_eq!(RaidState::parse("online"), Some(RaidState::Online));
        assert_eq!(RaidState::parse("all"), None);
    }

    #[test]
    fn raid_table() {
        use RaidState::*;
        let all = [Configuring, Online, Offline];
        for a in all {
            for b in all {
                let legal = matches!(
                    (a, b),
                    (Configuring, Online) | (Configuring, Offline) | (Online, Offline)
                );
                let mut s = a;
                assert_eq!(s.move_to(b).is_ok(), legal, "{a:?} -> {b:?}");
                assert_eq!(s, if legal { b } else { a });
            }
        }
    }
}
