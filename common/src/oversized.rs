//! Events larger than `--max-event-bytes`: where their whole text goes, and how it is read back.
//!
//! An event is never dropped for its size and never stops capture. The producer writes an event
//! whose record would pass the limit (`--max-event-bytes`, or a smaller `max.message.bytes` of a
//! topic that existed before walrelay created it) twice:
//!
//! ```text
//!   whole event ──split──▶ <topic>.oversized   partition P: chunk 0 … chunk n-1 (key: the id)
//!   the row, its largest values replaced ──▶ <topic>   partition P (where its key puts it),
//!       each replaced column: the unchanged-TOAST placeholder, listed in `unchanged_toast`,
//!       and `"oversized": {topic, partition, id, columns, chunks, bytes}` naming the chunks
//! ```
//!
//! The chunks go first, in the same Postgres transaction as the event for the checkpointer: the
//! slot is confirmed past the row only once Kafka acknowledged every chunk and the row. Chunks
//! of one event share an id and are on one partition in index order, though chunks of other
//! oversized events (parallel snapshot workers) may sit between them.
//!
//! **The rule for sinks.** A replaced column is listed in `unchanged_toast`, so a sink keeps what
//! it holds for it, exactly as for an unchanged TOASTed value: the search index and the Postgres
//! target do that. The whole event is read with [`Reassembler`] from the chunks at the
//! reference (read the partition it names and feed it every chunk record). Under Avro the reference travels in the
//! record header [`HEADER`] (the Avro schemas stay as registered); under JSON it is in the
//! envelope and in the header.
//!
//! A chunk record's value is one line of JSON ([`ChunkHeader`]), a newline, then the chunk's
//! bytes (any bytes: an Avro value is split the same way).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The record header that carries the reference (JSON of [`Reference`]) on the main record.
pub const HEADER: &str = "walrelay.oversized";

/// The topic that holds the chunks of `topic`'s oversized events.
pub fn chunk_topic(topic: &str) -> String {
    format!("{topic}.oversized")
}

/// Where the whole text of an oversized event is: the envelope's `oversized` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// The chunk topic (`<topic>.oversized`).
    pub topic: String,
    /// Its partition holding the chunks (the main record's partition number).
    pub partition: i32,
    /// The chunks' key and id.
    pub id: String,
    /// The columns replaced in this record (of `after`, and of `before` where it had them).
    pub columns: Vec<String>,
    /// How many chunks.
    pub chunks: u32,
    /// The whole event's size in bytes.
    pub bytes: u64,
}

/// The first line of a chunk record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// The event's id ([`Reference::id`]).
    pub id: String,
    /// 0-based.
    pub index: u32,
    /// Chunks of the event.
    pub count: u32,
    /// The whole event's size in bytes.
    pub bytes: u64,
}

/// A chunk record that cannot be read, or an event that cannot be put together. Definite: the
/// record will not read differently next time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// No header line, or one that is not a chunk header.
    #[error("not a walrelay chunk record ({0}): is this a <topic>.oversized topic?")]
    Malformed(String),
    /// The chunks disagree with each other or with their header.
    #[error("chunks of oversized event {id} disagree: {problem}")]
    Inconsistent {
        /// The event's id.
        id: String,
        /// What does not fit.
        problem: String,
    },
    /// Putting the event together would hold more than allowed.
    #[error(
        "oversized event {id} is {bytes} bytes, over the {limit} bytes this reader may hold; \
         raise the reader's limit"
    )]
    TooLarge {
        /// The event's id.
        id: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
}

/// Appends a chunk record's value to `out`.
pub fn write_chunk(out: &mut Vec<u8>, header: &ChunkHeader, data: &[u8]) {
    // A struct of strings and integers always serialises.
    if serde_json::to_writer(&mut *out, header).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.push(b'\n');
    out.extend_from_slice(data);
}

/// A chunk record's header and data.
pub fn read_chunk(value: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
    let nl = value
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| ChunkError::Malformed("no header line".into()))?;
    let header: ChunkHeader = serde_json::from_slice(&value[..nl])
        .map_err(|e| ChunkError::Malformed(format!("header: {e}")))?;
    if header.count == 0 || header.index >= header.count {
        return Err(ChunkError::Malformed(format!(
            "chunk {} of {}",
            header.index, header.count
        )));
    }
    Ok((header, &value[nl + 1..]))
}

/// Puts oversized events together from their chunks, read in partition order. Holds at most
/// `limit` bytes of partial events; an event that would pass it is refused.
#[derive(Debug)]
pub struct Reassembler {
    limit: u64,
    held: u64,
    partial: HashMap<String, Partial>,
}

#[derive(Debug)]
struct Partial {
    next: u32,
    count: u32,
    bytes: u64,
    data: Vec<u8>,
}

impl Reassembler {
    /// A reassembler holding at most `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            held: 0,
            partial: HashMap::new(),
        }
    }

    /// Takes one chunk record's value; returns the event's id and text once its last chunk
    /// arrived. A chunk of an event already begun twice (a producer's retry after a restart
    /// rewrote it) starts that event over.
    pub fn push(&mut self, value: &[u8]) -> Result<Option<(String, Vec<u8>)>, ChunkError> {
        let (h, data) = read_chunk(value)?;
        if h.index == 0 {
            if let Some(old) = self.partial.remove(&h.id) {
                self.held -= old.data.len() as u64;
            }
            if h.bytes > self.limit.saturating_sub(self.held) {
                return Err(ChunkError::TooLarge {
                    id: h.id,
                    bytes: h.bytes,
                    limit: self.limit,
                });
            }
            self.partial.insert(
                h.id.clone(),
                Partial {
                    next: 0,
                    count: h.count,
                    bytes: h.bytes,
                    data: Vec::with_capacity(usize::try_from(h.bytes).unwrap_or(0)),
                },
            );
        }
        let inconsistent = |problem: String| ChunkError::Inconsistent {
            id: h.id.clone(),
            problem,
        };
        let Some(p) = self.partial.get_mut(&h.id) else {
            // The event began before where this reader started: not whole here.
            return Ok(None);
        };
        if p.next != h.index || p.count != h.count || p.bytes != h.bytes {
            return Err(inconsistent(format!(
                "chunk {} of {} ({} bytes) where chunk {} of {} ({} bytes) was expected",
                h.index, h.count, h.bytes, p.next, p.count, p.bytes
            )));
        }
        if p.data.len() as u64 + data.len() as u64 > p.bytes {
            return Err(inconsistent(format!(
                "more than the {} bytes announced",
                p.bytes
            )));
        }
        p.data.extend_from_slice(data);
        self.held += data.len() as u64;
        p.next += 1;
        if p.next < p.count {
            return Ok(None);
        }
        let done = self
            .partial
            .remove(&h.id)
            .unwrap_or_else(|| unreachable!("looked up above"));
        self.held -= done.data.len() as u64;
        if done.data.len() as u64 != done.bytes {
            return Err(inconsistent(format!(
                "{} bytes where {} were announced",
                done.data.len(),
                done.bytes
            )));
        }
        Ok(Some((h.id, done.data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(id: &str, text: &[u8], size: usize) -> Vec<Vec<u8>> {
        let parts: Vec<&[u8]> = text.chunks(size).collect();
        parts
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut v = Vec::new();
                let h = ChunkHeader {
                    id: id.into(),
                    index: i as u32,
                    count: parts.len() as u32,
                    bytes: text.len() as u64,
                };
                write_chunk(&mut v, &h, d);
                v
            })
            .collect()
    }

    #[test]
    fn interleaved_events_come_back_whole() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let b = b"{\"op\":\"c\",\"after\":{\"x\":\"\n\"}}".repeat(40);
        let (ca, cb) = (chunks("a", &a, 999), chunks("b", &b, 100));
        let mut r = Reassembler::new(1 << 20);
        let mut out = Vec::new();
        for i in 0..ca.len().max(cb.len()) {
            for c in [ca.get(i), cb.get(i)].into_iter().flatten() {
                if let Some(done) = r.push(c).expect("valid chunks") {
                    out.push(done);
                }
            }
        }
        out.sort();
        assert_eq!(out, vec![("a".into(), a), ("b".into(), b)]);
        assert_eq!(r.held, 0);
    }

    #[test]
    fn a_rewritten_event_starts_over_and_gaps_are_named() {
        let text = vec![7u8; 300];
        let c = chunks("e", &text, 100);
        let mut r = Reassembler::new(1 << 20);
        assert_eq!(r.push(&c[0]), Ok(None));
        assert_eq!(r.push(&c[1]), Ok(None));
        // The producer restarted and wrote the event again from its first chunk.
        assert_eq!(r.push(&c[0]), Ok(None));
        assert_eq!(r.push(&c[1]), Ok(None));
        assert_eq!(r.push(&c[2]), Ok(Some(("e".into(), text))));
        // A chunk missing in the middle is an error naming the event, not a wrong value.
        assert_eq!(r.push(&c[0]), Ok(None));
        let err = r.push(&c[2]).expect_err("a gap");
        assert!(err.to_string().contains("chunk 2 of 3"), "{err}");
    }

    #[test]
    fn limits_and_malformed_records_are_refused() {
        let c = chunks("big", &[1u8; 5000], 1000);
        let mut r = Reassembler::new(4096);
        assert!(matches!(r.push(&c[0]), Err(ChunkError::TooLarge { .. })));
        assert!(matches!(
            r.push(b"not a chunk"),
            Err(ChunkError::Malformed(_))
        ));
        assert!(matches!(
            r.push(b"{\"id\":\"x\",\"index\":3,\"count\":2,\"bytes\":1}\nx"),
            Err(ChunkError::Malformed(_))
        ));
    }
}
