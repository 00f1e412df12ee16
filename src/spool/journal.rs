//! The journal's storage: its table in the spool's file, written with the writer's commits.
//!
//! What an event is and what a query asks for is `crate::journal`; reading
//! and trimming the table are `Spool` methods here.

use super::{Spool, SpoolError};
use crate::journal::{Event, Filter, MAX_LISTED};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::sync::atomic::{AtomicU64, Ordering};

/// The journal (see `journal`): time in ms × 1000 + a sequence number → event.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
static JOURNAL_SEQ: AtomicU64 = AtomicU64::new(0);

/// Journal events, the oldest beyond `max` dropped at once, whatever the rate.
pub(super) fn put_events<'a>(
    txn: &redb::WriteTransaction,
    events: impl Iterator<Item = &'a Event>,
    max: usize,
) -> Result<(), SpoolError> {
    let mut table = redb_try!(txn.open_table(JOURNAL), "journal write");
    for e in events {
        let seq = JOURNAL_SEQ.fetch_add(1, Ordering::Relaxed) % 1000;
        let key = e.time_ms.saturating_mul(1000).saturating_add(seq);
        let bytes = serde_json::to_vec(&e.bounded()).map_err(|x| SpoolError::with("journal encode", x))?;
        redb_try!(table.insert(key, bytes.as_slice()), "journal write");
    }
    let over = redb_try!(table.len(), "journal read").saturating_sub(max as u64);
    for _ in 0..over {
        redb_try!(table.pop_first(), "journal write");
    }
    Ok(())
}

impl Spool {
    /// journal.max_events, enforced as the journal grows.
    pub fn set_journal_limit(&self, max_events: usize) {
        self.journal_max.store(max_events.max(1), Ordering::Relaxed);
    }

    /// The events that match, oldest first, at most `journal::MAX_LISTED`.
    pub fn journal(&self, filter: &Filter) -> Result<Vec<Event>, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_read(), "journal read");
        let table = match txn.open_table(JOURNAL) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(SpoolError::with("journal read", e)),
        };
        let mut out = Vec::new();
        for entry in redb_try!(table.range(filter.since_ms.saturating_mul(1000)..), "journal read") {
            let (key, value) = redb_try!(entry, "journal read");
            let Ok(mut e) = serde_json::from_slice::<Event>(value.value()) else {
                continue;
            };
            e.time_ms = key.value() / 1000;
            if e.matches(filter) {
                out.push(e);
                if out.len() >= MAX_LISTED {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Forgets journal events before `before_ms`, and the oldest beyond
    /// `max_events`; returns how many.
    pub fn journal_purge(&self, before_ms: u64, max_events: usize) -> Result<usize, SpoolError> {
        let txn = redb_try!(self.db.get()?.begin_write(), "journal write");
        let removed;
        {
            let mut table = redb_try!(txn.open_table(JOURNAL), "journal write");
            let total = redb_try!(table.len(), "journal read") as usize;
            let mut old: Vec<u64> = Vec::new();
            for entry in redb_try!(table.iter(), "journal read") {
                let (key, _) = redb_try!(entry, "journal read");
                let k = key.value();
                if k / 1000 < before_ms || total.saturating_sub(old.len()) > max_events {
                    old.push(k);
                } else {
                    break;
                }
            }
            for k in &old {
                redb_try!(table.remove(*k), "journal write");
            }
            removed = old.len();
        }
        redb_try!(txn.commit(), "journal commit");
        Ok(removed)
    }
}
