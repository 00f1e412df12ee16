//! The spool's file: opening it, its tables, its layout version and the migration of an earlier one.

use super::SpoolError;
use crate::errors;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    thread,
    time::Duration,
};

/// id → Record (JSON).
pub(super) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// id → time of the next attempt (ms since the epoch), for pending records only.
pub(super) const PENDING: TableDefinition<&str, u64> = TableDefinition::new("pending");
/// id → creation time (ms), for pending records only: metrics read it
/// instead of every record's payload.
pub(super) const PENDING_SINCE: TableDefinition<&str, u64> = TableDefinition::new("pending_since");
/// (time of the next attempt, id) for pending records: a scan reads the
/// due ones and stops at the first not due, however long the backlog.
pub(super) const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
/// "layout" → the spool's layout version.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// 1: records, pending, pending_since, content (`content::CONTENT`),
/// journal (`journal::JOURNAL`). 2: due.
pub(super) const LAYOUT: u64 = 2;

/// Page cache of the spool's database.
const SPOOL_CACHE: usize = 16 << 20;

/// Opens (or creates) the spool's file, waiting up to `wait` while another
/// process holds it. A file that is not a spool is an error, never reset.
pub(super) fn open(path: &Path, wait: Duration) -> Result<Database, SpoolError> {
    let start = std::time::Instant::now();
    let db = loop {
        // redb caches up to 1 GiB of pages by default: memory would grow
        // with the backlog. The hot pages (due index, recent records) fit.
        match Database::builder().set_cache_size(SPOOL_CACHE).create(path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < wait => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(SpoolError::new(format!(
                    "spool {} is in use by another process",
                    path.display()
                )))
            }
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                use std::os::unix::fs::MetadataExt;
                let owner = std::fs::metadata(path)
                    .map(|m| {
                        format!(
                            "it belongs to uid {} gid {} (mode {:o})",
                            m.uid(),
                            m.gid(),
                            m.mode() & 0o7777
                        )
                    })
                    .unwrap_or_else(|_| "its directory may not be written".into());
                return Err(SpoolError::new(format!(
                    "cannot open spool {}: permission denied: {owner}; run as the state_dir's owner, \
                     or chown the file to the service user (imip-milter)",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(SpoolError::with(
                    format!(
                        "cannot open spool {} (a file that is not an imip-milter spool is never overwritten; \
                         move it away)",
                        path.display()
                    ),
                    e,
                ))
            }
        }
    };
    // Tokens are capabilities: the spool is for the daemon's user alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(db)
}

/// The database handle, replaceable: redb must be closed and opened again
/// after an I/O error (a full disk, say) before it takes writes again.
pub(super) struct DbCell {
    path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
}

impl DbCell {
    pub(super) fn new(path: &Path, db: Arc<Database>) -> Self {
        Self {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
        }
    }

    pub(super) fn get(&self) -> Result<Arc<Database>, SpoolError> {
        let guard = self.db.read().map_err(|_| SpoolError::new("spool lock poisoned"))?;
        guard.clone().ok_or_else(|| SpoolError::new("spool is being reopened"))
    }

    /// Closes and opens the database again; waits briefly for readers.
    pub(super) fn reopen(&self) {
        let Ok(mut guard) = self.db.write() else { return };
        if let Some(mut old) = guard.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if std::time::Instant::now() < deadline => {
                        old = still_shared;
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(still_shared) => {
                        // Someone holds it; try again at the next failure.
                        *guard = Some(still_shared);
                        return;
                    }
                }
            }
        }
        match Database::builder().set_cache_size(SPOOL_CACHE).create(&self.path) {
            Ok(db) => {
                tracing::warn!("spool {} reopened after an I/O error", self.path.display());
                *guard = Some(Arc::new(db));
            }
            Err(e) => tracing::error!(
                "spool {} cannot be reopened: {}",
                self.path.display(),
                errors::chain(&e)
            ),
        }
    }
}

/// Brings a spool of an earlier layout to `LAYOUT`, in one transaction at
/// start; a spool of a later one (a downgrade) is refused, never rewritten.
pub(super) fn migrate(db: &Database, path: &Path) -> Result<(), SpoolError> {
    let txn = redb_try!(db.begin_write(), "spool");
    {
        let mut meta = redb_try!(txn.open_table(META), "spool");
        let records = redb_try!(txn.open_table(RECORDS), "spool");
        let version = redb_try!(meta.get("layout"), "spool").map(|v| v.value());
        // No version: a new spool, or one of layout 1 (before the version).
        let version = match version {
            Some(v) => v,
            None if redb_try!(records.is_empty(), "spool") => LAYOUT,
            None => 1,
        };
        if version > LAYOUT {
            return Err(SpoolError::new(format!(
                "spool {} has layout {version}, newer than this imip-milter's {LAYOUT}: run the newer version, \
                 or move the file away",
                path.display()
            )));
        }
        if version < 2 {
            let pending = redb_try!(txn.open_table(PENDING), "spool");
            let mut index = redb_try!(txn.open_table(DUE), "spool");
            let mut n = 0;
            for entry in redb_try!(pending.iter(), "spool") {
                let (id, at) = redb_try!(entry, "spool");
                redb_try!(index.insert((at.value(), id.value()), ()), "spool");
                n += 1;
            }
            tracing::info!(
                "spool {}: layout 1 → 2, {n} pending records indexed by due time",
                path.display()
            );
        }
        redb_try!(meta.insert("layout", LAYOUT), "spool");
    }
    redb_try!(txn.commit(), "spool");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{clock::now_ms, spool::Spool, spool::State};
    use redb::ReadableDatabase;

    /// A spool written by the release before the due index (layout 1, three
    /// pending replies to a webhook that was down), opened and migrated.
    #[test]
    fn a_spool_of_layout_1_is_migrated_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spool/spool-v1.redb.gz");
        let out = std::process::Command::new("gzip")
            .args(["-dc", fixture])
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(&path, out.stdout).unwrap();
        for _ in 0..2 {
            let spool = Spool::open_waiting(&path, Duration::from_secs(5)).unwrap();
            let (due, next) = spool.due(now_ms(), 10, &|_| false).unwrap();
            assert_eq!((due.len(), next), (3, None));
            assert!(due.iter().all(|r| r.state == State::Pending && r.attempts == 1));
            let txn = spool.database().unwrap().begin_read().unwrap();
            let layout = txn.open_table(META).unwrap().get("layout").unwrap().map(|v| v.value());
            assert_eq!(layout, Some(LAYOUT));
        }
        // An outcome moves a record in the index: due later, then delivered.
        let spool = Spool::open_waiting(&path, Duration::from_secs(5)).unwrap();
        let (mut due, _) = spool.due(now_ms(), 10, &|_| false).unwrap();
        let mut later = due.remove(0);
        later.next_attempt_ms = now_ms() + 60_000;
        spool.update(&later).unwrap();
        let (left, next) = spool.due(now_ms(), 10, &|_| false).unwrap();
        assert_eq!((left.len(), next), (2, Some(later.next_attempt_ms)));
        // Cut short by the limit: no word on the next.
        let (left, next) = spool.due(now_ms(), 1, &|_| false).unwrap();
        assert_eq!((left.len(), next), (1, None));
        let mut done = due.remove(0);
        done.state = State::Delivered;
        spool.update(&done).unwrap();
        assert!(spool.delete(&due[0].id).unwrap());
        let (left, next) = spool.due(now_ms(), 10, &|_| false).unwrap();
        assert_eq!((left.len(), next), (0, Some(later.next_attempt_ms)));
    }

    #[test]
    fn a_spool_of_a_later_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("layout", LAYOUT + 1).unwrap();
            txn.commit().unwrap();
        }
        let e = Spool::open(&path).err().expect("must refuse");
        let e = errors::chain(&e);
        assert!(e.contains("newer than this imip-milter"), "{e}");
    }

    #[test]
    fn foreign_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        std::fs::write(&path, b"this is not a database, but somebody's notes\n".repeat(100)).unwrap();
        let e = Spool::open(&path).err().expect("must refuse");
        let e = errors::chain(&e);
        assert!(e.contains("never overwritten"), "{e}");
        assert!(std::fs::read(&path).unwrap().starts_with(b"this is not a database"));
    }
}
