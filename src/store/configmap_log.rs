//! A session's transcript kept in ConfigMaps it owns: gzip-compressed JSON-lines chunks
//! named `<session>-transcript-<n>`. Only the last chunk is ever rewritten; a full one is
//! left as it is and the log goes on in the next. The ConfigMaps are garbage collected
//! with the session.

use std::collections::BTreeMap;
use std::sync::Mutex as SyncMutex;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
use thiserror::Error;
use tokio::sync::Mutex;

use super::transcript::{Record, compress, decode, decompress, encode};
use crate::agent::{ChatMessage, Journal, JournalError};
use crate::redact::Redactor;

/// Key of the compressed records in a chunk's `binaryData`.
pub const CHUNK_KEY: &str = "records.jsonl.gz";
/// Label selecting all chunks of one session, by uid (names may be longer than a label).
pub const SESSION_UID_LABEL: &str = "ml-intern.io/session-uid";
/// Label with a chunk's position in the log.
pub const CHUNK_LABEL: &str = "ml-intern.io/transcript-chunk";
const FIELD_MANAGER: &str = "ml-intern-controller";
/// A chunk stops growing past this compressed size, well under a ConfigMap's 1 MiB.
const CHUNK_COMPRESSED_BYTES: usize = 640 * 1024;
const WRITE_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot write transcript ConfigMap {name}: {source}")]
    Write { name: String, source: kube::Error },
    #[error("cannot list the transcript ConfigMaps of session {session}: {source}")]
    List {
        session: String,
        source: kube::Error,
    },
    #[error("transcript ConfigMap {name} is damaged: {detail}")]
    Damaged { name: String, detail: String },
}

/// Counters for the session's status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TranscriptStats {
    pub chunks: u32,
    pub records: u64,
    pub compressed_bytes: u64,
}

struct OpenChunk {
    index: u32,
    /// Every record of this chunk, as JSON lines.
    lines: Vec<u8>,
    records: u64,
    compressed_len: usize,
    /// Records and compressed bytes of the chunks before this one.
    sealed_records: u64,
    sealed_bytes: u64,
}

pub struct TranscriptStore {
    api: Api<ConfigMap>,
    session: String,
    uid: String,
    owner: OwnerReference,
    redactor: Redactor,
    open: Mutex<OpenChunk>,
    /// Encoded event records waiting to go out with the next write.
    pending: SyncMutex<Vec<u8>>,
    stats: SyncMutex<TranscriptStats>,
}

fn chunk_name(session: &str, index: u32) -> String {
    format!("{session}-transcript-{index:04}")
}

impl TranscriptStore {
    /// Reads the session's transcript, if it has one, and opens it for appending.
    pub async fn open(
        api: Api<ConfigMap>,
        session: &str,
        uid: &str,
        owner: OwnerReference,
        redactor: Redactor,
    ) -> Result<(Self, Vec<Record>), StoreError> {
        let chunks = read_chunks(&api, session, uid).await?;
        let mut records = Vec::new();
        let mut open = OpenChunk {
            index: 0,
            lines: Vec::new(),
            records: 0,
            compressed_len: 0,
            sealed_records: 0,
            sealed_bytes: 0,
        };
        let count = chunks.len();
        for (i, (index, name, compressed)) in chunks.into_iter().enumerate() {
            let (lines, chunk_records) = decode_chunk(&name, &compressed)?;
            let n = chunk_records.len() as u64;
            records.extend(chunk_records);
            if i + 1 == count && compressed.len() < CHUNK_COMPRESSED_BYTES {
                open.index = index;
                open.lines = lines;
                open.records = n;
                open.compressed_len = compressed.len();
            } else {
                open.index = index + 1;
                open.sealed_records += n;
                open.sealed_bytes += compressed.len() as u64;
            }
        }
        let store = TranscriptStore {
            api,
            session: session.to_string(),
            uid: uid.to_string(),
            owner,
            redactor,
            stats: SyncMutex::new(stats_of(&open)),
            open: Mutex::new(open),
            pending: SyncMutex::new(Vec::new()),
        };
        Ok((store, records))
    }

    pub fn stats(&self) -> TranscriptStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// The label selector that lists this session's chunks.
    pub fn selector(&self) -> String {
        format!("{SESSION_UID_LABEL}={}", self.uid)
    }

    /// Keeps a record for the next write; for events, which need not be durable at once.
    pub fn defer(&self, record: &Record) {
        let line = encode(record, &self.redactor);
        if let Ok(mut pending) = self.pending.lock() {
            pending.extend_from_slice(&line);
        }
    }

    /// Appends the records (and any deferred ones before them) and returns once they are
    /// stored.
    pub async fn write(&self, records: &[Record]) -> Result<(), StoreError> {
        let mut open = self.open.lock().await;
        let deferred: Vec<u8> = self
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        let mut new = deferred.clone();
        for r in records {
            new.extend_from_slice(&encode(r, &self.redactor));
        }
        if new.is_empty() {
            return Ok(());
        }
        let new_records = new.iter().filter(|b| **b == b'\n').count() as u64;
        let mut index = open.index;
        let mut lines = [open.lines.as_slice(), new.as_slice()].concat();
        let mut compressed = compress(&lines);
        let mut rolled = false;
        if compressed.len() > CHUNK_COMPRESSED_BYTES && !open.lines.is_empty() {
            // The open chunk is full and already stored as it is: go on in the next one.
            index += 1;
            lines = new.clone();
            compressed = compress(&lines);
            rolled = true;
        }
        if let Err(e) = self.store_chunk(index, &compressed).await {
            // Deferred records stay queued for the next write; the caller's records were
            // not stored, and it is told so.
            if let Ok(mut pending) = self.pending.lock() {
                let mut later = std::mem::take(&mut *pending);
                *pending = deferred;
                pending.append(&mut later);
            }
            return Err(e);
        }
        if rolled {
            open.sealed_records += open.records;
            open.sealed_bytes += open.compressed_len as u64;
            open.records = 0;
        }
        open.index = index;
        open.lines = lines;
        open.records += new_records;
        open.compressed_len = compressed.len();
        if let Ok(mut stats) = self.stats.lock() {
            *stats = stats_of(&open);
        }
        Ok(())
    }

    async fn store_chunk(&self, index: u32, compressed: &[u8]) -> Result<(), StoreError> {
        let name = chunk_name(&self.session, index);
        let chunk = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (SESSION_UID_LABEL.to_string(), self.uid.clone()),
                    (CHUNK_LABEL.to_string(), index.to_string()),
                    (
                        crate::runtime::MANAGED_BY_LABEL.0.to_string(),
                        crate::runtime::MANAGED_BY_LABEL.1.to_string(),
                    ),
                ])),
                owner_references: Some(vec![self.owner.clone()]),
                ..Default::default()
            },
            binary_data: Some(BTreeMap::from([(
                CHUNK_KEY.to_string(),
                ByteString(compressed.to_vec()),
            )])),
            ..Default::default()
        };
        let mut patch = serde_json::to_value(&chunk).unwrap_or_default();
        patch["apiVersion"] = "v1".into();
        patch["kind"] = "ConfigMap".into();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut delays = WRITE_RETRY_DELAYS.iter();
        loop {
            match self.api.patch(&name, &params, &Patch::Apply(&patch)).await {
                Ok(_) => return Ok(()),
                Err(source) => match delays.next() {
                    Some(d) => {
                        tracing::warn!(configmap = %name, error = %source, "transcript write failed; retrying");
                        tokio::time::sleep(*d).await;
                    }
                    None => return Err(StoreError::Write { name, source }),
                },
            }
        }
    }
}

fn stats_of(open: &OpenChunk) -> TranscriptStats {
    TranscriptStats {
        chunks: if open.lines.is_empty() {
            open.index
        } else {
            open.index + 1
        },
        records: open.sealed_records + open.records,
        compressed_bytes: open.sealed_bytes + open.compressed_len as u64,
    }
}

/// The session's chunks in log order: (index, name, compressed records).
async fn read_chunks(
    api: &Api<ConfigMap>,
    session: &str,
    uid: &str,
) -> Result<Vec<(u32, String, Vec<u8>)>, StoreError> {
    let list = api
        .list(&ListParams::default().labels(&format!("{SESSION_UID_LABEL}={uid}")))
        .await
        .map_err(|source| StoreError::List {
            session: session.to_string(),
            source,
        })?;
    let mut chunks = Vec::new();
    for cm in list.items {
        let name = cm.metadata.name.clone().unwrap_or_default();
        let index = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CHUNK_LABEL))
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| StoreError::Damaged {
                name: name.clone(),
                detail: format!("label {CHUNK_LABEL} is missing or not a number"),
            })?;
        let data = cm
            .binary_data
            .and_then(|mut d| d.remove(CHUNK_KEY))
            .map(|b| b.0)
            .unwrap_or_default();
        chunks.push((index, name, data));
    }
    chunks.sort_by_key(|c| c.0);
    Ok(chunks)
}

/// Every record of a session's transcript, for readers such as `ml-intern transcript`.
pub async fn read_transcript(
    api: &Api<ConfigMap>,
    session: &str,
    uid: &str,
) -> Result<Vec<Record>, StoreError> {
    let mut records = Vec::new();
    for (_, name, compressed) in read_chunks(api, session, uid).await? {
        records.extend(decode_chunk(&name, &compressed)?.1);
    }
    Ok(records)
}

/// A chunk's JSON lines and the records they hold.
fn decode_chunk(name: &str, compressed: &[u8]) -> Result<(Vec<u8>, Vec<Record>), StoreError> {
    let damaged = |detail: String| StoreError::Damaged {
        name: name.to_string(),
        detail,
    };
    let lines = decompress(compressed).map_err(damaged)?;
    let records = decode(&lines).map_err(damaged)?;
    Ok((lines, records))
}

#[async_trait]
impl Journal for TranscriptStore {
    async fn append(&self, messages: &[ChatMessage]) -> Result<(), JournalError> {
        let records: Vec<Record> = messages
            .iter()
            .map(|m| Record::Message { message: m.clone() })
            .collect();
        self.write(&records)
            .await
            .map_err(|e| JournalError(e.to_string()))
    }

    async fn replace(&self, history: &[ChatMessage]) -> Result<(), JournalError> {
        self.write(&[Record::Replace {
            history: history.to_vec(),
        }])
        .await
        .map_err(|e| JournalError(e.to_string()))
    }
}
