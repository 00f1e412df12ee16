//! Calendar text shared between records: stored once under its hash, however many records carry it.
//!
//! A record keeps a long text's hash in its payload's `icalendar_ref`
//! instead of the text (CONTENT holds the text); reading the record puts
//! the text back.

use super::SpoolError;
use redb::{ReadableTable, TableDefinition};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Calendar text, stored once under its hash however many records (one
/// per gateway recipient) carry it.
pub(super) const CONTENT: TableDefinition<&str, &[u8]> = TableDefinition::new("content");
/// Shorter calendar text stays inside its record.
const SHARE_FROM: usize = 2048;

/// Stores the payload's calendar text in CONTENT (once per text) when it
/// is long enough to share; returns its key, for `refer`. None: the text
/// stays in the payload.
pub(super) fn share(payload: &Value, content: &mut redb::Table<&str, &[u8]>) -> Result<Option<String>, SpoolError> {
    let Some(text) = payload.get("icalendar").and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    if text.len() < SHARE_FROM {
        return Ok(None);
    }
    store(text.as_bytes(), content).map(Some)
}

/// Stores `bytes` once under their hash; returns the key.
pub(super) fn store(bytes: &[u8], content: &mut redb::Table<&str, &[u8]>) -> Result<String, SpoolError> {
    let key: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    if redb_try!(content.get(key.as_str()), "spool read").is_none() {
        redb_try!(content.insert(key.as_str(), bytes), "spool write");
    }
    Ok(key)
}

/// The payload as stored: the shared text replaced by its key.
pub(super) fn refer(payload: &mut Value, key: String) {
    if let Some(obj) = payload.as_object_mut() {
        obj.remove("icalendar");
        obj.insert("icalendar_ref".into(), key.into());
    }
}

/// The payload as read: the shared text back in place of its key.
pub(super) fn restore(payload: &mut Value, content: &impl ReadableTable<&'static str, &'static [u8]>) {
    let key = reference(payload).map(str::to_owned);
    if let (Some(key), Some(obj)) = (key, payload.as_object_mut()) {
        if let Ok(Some(text)) = content.get(key.as_str()) {
            obj.insert(
                "icalendar".into(),
                String::from_utf8_lossy(text.value()).into_owned().into(),
            );
            obj.remove("icalendar_ref");
        }
    }
}

/// The key of the shared text a stored payload refers to.
pub(super) fn reference(payload: &Value) -> Option<&str> {
    payload.get("icalendar_ref").and_then(|v| v.as_str())
}

/// Removes the texts whose keys are not in `kept`.
pub(super) fn keep_only(content: &mut redb::Table<&str, &[u8]>, kept: &HashSet<&str>) -> Result<(), SpoolError> {
    let mut unused = Vec::new();
    for entry in redb_try!(content.iter(), "spool read") {
        let (key, _) = redb_try!(entry, "spool read");
        if !kept.contains(key.value()) {
            unused.push(key.value().to_owned());
        }
    }
    for key in &unused {
        redb_try!(content.remove(key.as_str()), "spool write");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{
        clock::now_ms,
        spool::{tests::record, Record, Spool, State},
    };

    #[tokio::test]
    async fn calendar_text_is_stored_once_for_many_recipients() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.redb");
        let spool = Spool::open(&path).unwrap();
        let big = format!("X-PAD:{}", "y".repeat(200_000));
        let records: Vec<Record> = (0..10)
            .map(|i| {
                let mut r = record(&format!("same\r\n{big}"));
                r.id = format!("r{i}");
                r.payload["token"] = format!("token{i:04}").into();
                r
            })
            .collect();
        let text = records[0].payload["icalendar"].as_str().unwrap().to_owned();
        spool.append(records).await.unwrap();
        spool.flush().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 1_500_000, "10 records of 200 kB take {size} bytes");
        // Deliveries and `queue show` get the text back.
        let (due, _) = spool.due(now_ms() + 1, 20, &|_| false).unwrap();
        assert_eq!(due.len(), 10);
        assert!(due.iter().all(|r| r.payload["icalendar"] == text.as_str()));
        assert_eq!(spool.get("r3").unwrap().unwrap().payload["icalendar"], text.as_str());
        // An outcome written back stays shared; a purge drops what no record needs.
        let mut r = spool.get("r0").unwrap().unwrap();
        r.state = State::Delivered;
        r.finished_ms = Some(1);
        spool.update(&r).unwrap();
        assert_eq!(spool.purge_finished(2, 0).unwrap(), 1);
        assert_eq!(spool.get("r1").unwrap().unwrap().payload["icalendar"], text.as_str());
    }

    #[tokio::test]
    async fn a_reply_is_kept_as_it_arrived_until_it_is_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool.redb")).unwrap();
        let message = std::sync::Arc::new(b"From: b@example.com\r\n\r\nthe reply".to_vec());
        let records: Vec<Record> = ["ok", "bad"]
            .iter()
            .map(|id| {
                let mut r = record(id);
                r.id = (*id).into();
                r.original = Some(message.clone());
                r
            })
            .collect();
        spool.append(records).await.unwrap();
        spool.flush().unwrap();
        let stored = spool.get("ok").unwrap().unwrap();
        assert!(stored.original.is_none() && stored.message_ref.is_some());
        assert_eq!(spool.original(&stored).unwrap().as_deref(), Some(message.as_slice()));
        for (id, state) in [("ok", State::Delivered), ("bad", State::Failed)] {
            let mut r = spool.get(id).unwrap().unwrap();
            r.state = state;
            r.finished_ms = Some(now_ms());
            spool.update(&r).unwrap();
        }
        // The purge forgets no record yet, and the delivered one's message
        // only when no failed record shares it.
        assert_eq!(spool.purge_finished(0, 0).unwrap(), 0);
        let failed = spool.get("bad").unwrap().unwrap();
        assert_eq!(spool.original(&failed).unwrap().as_deref(), Some(message.as_slice()));
        spool.delete("bad").unwrap();
        spool.purge_finished(0, 0).unwrap();
        let delivered = spool.get("ok").unwrap().unwrap();
        assert_eq!(spool.original(&delivered).unwrap(), None);
    }
}
