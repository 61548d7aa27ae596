//! The manager's store: an embedded transactional file (redb). Objects are JSON
//! under `kind/name` keys; a write transaction is atomic and durable when it
//! commits, so the manager can be killed at any moment and restart from it.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");

/// Store errors name the key and the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: Box<redb::Error>,
    },
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    #[error("store key {key}: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

macro_rules! db {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Db(Box::new(e.into())))
    };
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// A write transaction. It remembers whether anything really changed, so that
/// the periodic reconcile, which re-writes every object it looked at, costs no
/// commit (and no fsync) when nothing did: otherwise every attach would queue
/// behind one durable commit per volume per tick.
#[allow(missing_debug_implementations)]
pub struct Txn {
    t: redb::WriteTransaction,
    dirty: bool,
}

impl Txn {
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let tab = db!(self.t.open_table(OBJECTS))?;
        let v = db!(tab.get(key))?;
        match v {
            None => Ok(None),
            Some(b) => serde_json::from_slice(b.value())
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    key: key.into(),
                    source,
                }),
        }
    }
    pub fn put<T: Serialize>(&mut self, key: &str, v: &T) -> Result<(), StoreError> {
        let b = serde_json::to_vec(v).map_err(|source| StoreError::Decode {
            key: key.into(),
            source,
        })?;
        let mut tab = db!(self.t.open_table(OBJECTS))?;
        if db!(tab.get(key))?.is_some_and(|old| old.value() == b.as_slice()) {
            return Ok(());
        }
        db!(tab.insert(key, b.as_slice()))?;
        self.dirty = true;
        Ok(())
    }
    pub fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        let mut tab = db!(self.t.open_table(OBJECTS))?;
        if db!(tab.remove(key))?.is_some() {
            self.dirty = true;
        }
        Ok(())
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e.into()),
        })?;
        let s = Store { db: Arc::new(db) };
        // Make sure the table exists so read transactions can open it.
        s.write(|t| {
            t.dirty = true;
            Ok(())
        })?;
        Ok(s)
    }

    /// Runs `f` in one write transaction; commits (durably) if it returns Ok
    /// and changed something.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Txn) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let t = db!(self.db.begin_write())?;
        {
            let _ = db!(t.open_table(OBJECTS))?;
        }
        let mut txn = Txn { t, dirty: false };
        let r = f(&mut txn)?;
        if txn.dirty {
            db!(txn.t.commit())?;
        } else {
            db!(txn.t.abort())?;
        }
        Ok(r)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let t = db!(self.db.begin_read())?;
        let tab = db!(t.open_table(OBJECTS))?;
        match db!(tab.get(key))? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(b.value())
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    key: key.into(),
                    source,
                }),
        }
    }

    /// Every object whose key starts with `prefix`, in key order.
    pub fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        self.list_from(prefix, prefix)
    }

    /// The objects under `prefix` whose keys are `from` or after, in key order.
    pub fn list_from<T: DeserializeOwned>(
        &self,
        prefix: &str,
        from: &str,
    ) -> Result<Vec<T>, StoreError> {
        let t = db!(self.db.begin_read())?;
        let tab = db!(t.open_table(OBJECTS))?;
        let mut out = Vec::new();
        for item in db!(tab.range(from.max(prefix)..))? {
            let (k, v) = db!(item)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            let key = k.value().to_string();
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|source| StoreError::Decode { key, source })?,
            );
        }
        Ok(out)
    }

    pub fn put<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        self.write(|t| t.put(key, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.redb");
        {
            let s = Store::open(&p).unwrap();
            s.put("volume/a", &1u32).unwrap();
            s.put("volume/b", &2u32).unwrap();
            s.put("replica/x", &3u32).unwrap();
            assert_eq!(s.list::<u32>("volume/").unwrap(), vec![1, 2]);
            assert_eq!(s.list_from::<u32>("volume/", "volume/b").unwrap(), vec![2]);
            assert_eq!(s.list_from::<u32>("volume/", "a").unwrap(), vec![1, 2]);
            assert!(s
                .list_from::<u32>("volume/", "volume/c")
                .unwrap()
                .is_empty());
            let r: Result<(), StoreError> = s.write(|t| {
                t.put("volume/c", &9u32)?;
                Err(StoreError::Db(Box::new(redb::Error::Corrupted(
                    "abort".into(),
                ))))
            });
            assert!(r.is_err());
            assert_eq!(
                s.get::<u32>("volume/c").unwrap(),
                None,
                "aborted transactions leave nothing"
            );
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.get::<u32>("volume/b").unwrap(), Some(2));
        s.write(|t| t.delete("volume/a")).unwrap();
        assert_eq!(s.list::<u32>("volume/").unwrap(), vec![2]);
    }

    #[test]
    fn unchanged_writes_do_not_commit_and_changes_still_persist() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.redb");
        {
            let s = Store::open(&p).unwrap();
            s.put("volume/a", &1u32).unwrap();
            let dirty = s
                .write(|t| {
                    t.put("volume/a", &1u32)?;
                    t.delete("volume/none")?;
                    Ok(t.dirty)
                })
                .unwrap();
            assert!(!dirty, "same bytes and a missing key change nothing");
            let dirty = s
                .write(|t| {
                    t.put("volume/a", &1u32)?;
                    t.put("volume/b", &2u32)?;
                    Ok(t.dirty)
                })
                .unwrap();
            assert!(dirty);
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.list::<u32>("volume/").unwrap(), vec![1, 2]);
    }
}
