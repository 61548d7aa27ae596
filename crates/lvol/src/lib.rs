//! The replica store: thin-provisioned logical volumes with snapshot chains on a
//! directory of a local filesystem, crash-safe, served as [`bdev::Bdev`]s.
//!
//! A directory is an lvstore ([`LvStore`]); it holds lvols, each a *layer* of
//! blocks plus a parent snapshot. A head (or clone) is writable; a snapshot is
//! read-only. Reads resolve each block to the newest layer of the chain holding
//! it, through an in-memory index, so their cost does not depend on the chain's
//! length. See `DESIGN.md` beside this crate for the on-disk layout, the crash
//! model and what copies data.
//!
//! The API maps one to one onto the dataplane's JSON-RPC methods:
//!
//! | RPC | API |
//! |---|---|
//! | `bdev_lvol_create_lvstore` (on a directory) | [`Lvstores::create_lvstore`] ([`LvStore::create_dir`]) |
//! | `bdev_lvol_get_lvstores` | [`Lvstores::get_lvstores`] ([`LvStore::info`]) |
//! | `bdev_lvol_delete_lvstore` | [`Lvstores::delete_lvstore`] ([`LvStore::destroy`]) |
//! | `bdev_lvol_create` | [`LvStore::create_lvol`] |
//! | `bdev_lvol_resize` | [`LvStore::resize`] |
//! | `bdev_lvol_delete` | [`LvStore::delete`] |
//! | `bdev_lvol_snapshot` | [`LvStore::snapshot`] |
//! | `bdev_lvol_clone` | [`LvStore::clone_snapshot`] |
//! | `bdev_lvol_get_lvols` | [`LvStore::lvols`] / [`LvStore::chain`] |
//! | `corral_lvol_revert` | [`LvStore::revert`] |
//! | `corral_lvol_get_fragmap` | [`LvStore::fragmap`] |
//! | `corral_lvol_get_checksum` | [`LvStore::checksum`] |
//!
//! Errors are [`LvolError`]s; [`LvolError::errno`] is the one place that maps
//! them to SPDK's codes.

pub mod bdev;
pub mod error;
pub mod fault;
mod gate;
mod layer;
mod map;
pub mod meta;
pub mod registry;
pub mod storage;
pub mod store;

pub use crate::bdev::LvolBdev;
pub use error::{LvolError, Result};
pub use registry::Lvstores;
pub use storage::{DirStorage, Storage};
pub use store::{Checksum, CreateOpts, Fragmap, FragmapScope, LvStore, LvolInfo, LvstoreInfo};
