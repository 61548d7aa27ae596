//! [`Lvstores`]: the lvstores a dataplane has loaded, by name and UUID, for the
//! RPC methods that name an lvstore (`lvs_name`/`uuid`) or an lvol by alias.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::bdev::LvolBdev;
use crate::error::{LvolError, Result};
use crate::store::{CreateOpts, LvStore, LvolInfo, LvstoreInfo};

/// The loaded lvstores of one process. Names and UUIDs are unique among them.
#[derive(Debug, Default)]
pub struct Lvstores {
    stores: Mutex<Vec<LvStore>>,
}

impl Lvstores {
    pub fn new() -> Self {
        Self::default()
    }

    fn check_unique(stores: &[LvStore], s: &LvStore) -> Result<()> {
        let (u, n) = (s.uuid(), s.name());
        if stores.iter().any(|x| x.uuid() == u || x.name() == n) {
            return Err(LvolError::Exists {
                what: "lvstore",
                name: n,
            });
        }
        Ok(())
    }

    /// `bdev_lvol_create_lvstore {bdev_name: <directory>, lvs_name, cluster_sz}`:
    /// makes the directory an lvstore and loads it. Returns its UUID.
    pub fn create_lvstore(&self, dir: &Path, lvs_name: &str, opts: CreateOpts) -> Result<Uuid> {
        let mut stores = self.stores.lock();
        if stores.iter().any(|x| x.name() == lvs_name) {
            return Err(LvolError::Exists {
                what: "lvstore",
                name: lvs_name.into(),
            });
        }
        let s = LvStore::create_dir(dir, lvs_name, opts)?;
        let u = s.uuid();
        stores.push(s);
        Ok(u)
    }

    /// Loads the lvstore in `dir` (at start-up, or when a disk is added); with
    /// `expect`, refuses a directory that holds another store.
    pub fn load_lvstore(&self, dir: &Path, expect: Option<Uuid>) -> Result<Uuid> {
        let mut stores = self.stores.lock();
        let s = LvStore::open_dir(dir, expect)?;
        Self::check_unique(&stores, &s)?;
        let u = s.uuid();
        stores.push(s);
        Ok(u)
    }

    /// Adds an already opened store (tests, other storages).
    pub fn add(&self, s: LvStore) -> Result<()> {
        let mut stores = self.stores.lock();
        Self::check_unique(&stores, &s)?;
        stores.push(s);
        Ok(())
    }

    /// The store named `name` or with that UUID.
    pub fn get(&self, name_or_uuid: &str) -> Result<LvStore> {
        self.stores
            .lock()
            .iter()
            .find(|s| s.name() == name_or_uuid || s.uuid().to_string() == name_or_uuid)
            .cloned()
            .ok_or_else(|| LvolError::not_found("lvstore", name_or_uuid))
    }

    /// `bdev_lvol_get_lvstores {uuid?, lvs_name?}`.
    pub fn get_lvstores(&self, filter: Option<&str>) -> Result<Vec<LvstoreInfo>> {
        match filter {
            Some(f) => Ok(vec![self.get(f)?.info()?]),
            None => self.stores.lock().iter().map(|s| s.info()).collect(),
        }
    }

    /// `bdev_lvol_delete_lvstore {uuid | lvs_name}`.
    pub fn delete_lvstore(&self, name_or_uuid: &str) -> Result<()> {
        let s = self.get(name_or_uuid)?;
        s.destroy()?;
        self.stores.lock().retain(|x| x.uuid() != s.uuid());
        Ok(())
    }

    /// Finds the store of an lvol named by `lvs_name/lvol_name` or by UUID.
    pub fn store_of(&self, lvol: &str) -> Result<LvStore> {
        if let Some((lvs, _)) = lvol.split_once('/') {
            return self
                .get(lvs)
                .map_err(|_| LvolError::not_found("lvol", lvol));
        }
        self.stores
            .lock()
            .iter()
            .find(|s| s.lvol(lvol).is_ok())
            .cloned()
            .ok_or_else(|| LvolError::not_found("lvol", lvol))
    }

    /// `bdev_lvol_get_lvols {lvs_uuid?, lvs_name?}`.
    pub fn get_lvols(&self, lvs: Option<&str>) -> Result<Vec<LvolInfo>> {
        match lvs {
            Some(f) => self.get(f)?.lvols(),
            None => {
                let stores = self.stores.lock().clone();
                let mut v = vec![];
                for s in stores {
                    v.extend(s.lvols()?);
                }
                Ok(v)
            }
        }
    }

    /// The bdev of an lvol named by alias or UUID.
    pub fn bdev(&self, lvol: &str) -> Result<Arc<LvolBdev>> {
        self.store_of(lvol)?.bdev(lvol)
    }
}
