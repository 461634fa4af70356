//! Transaction metadata (`--transaction-metadata`), in Debezium's shape.
//!
//! With it, every data event (insert, update, delete, truncate) carries
//! `"transaction": {"id": "<xid>:<commit LSN>", "total_order": N, "data_collection_order": M}`
//! (its 1-based position among the transaction's data events, and among those of its table), and
//! the topic `<topic>.transactions` (one partition, keyed `{"id": "…"}`) gets a `BEGIN` record
//! before a transaction's first data event and an `END` record after its last, with the number
//! of events per table:
//!
//! ```json
//! {"status":"BEGIN","id":"742:23905744","event_count":null,"data_collections":null,"ts_ms":1700000000123}
//! {"status":"END","id":"742:23905744","event_count":3,
//!  "data_collections":[{"data_collection":"public.orders","event_count":2},
//!                      {"data_collection":"public.items","event_count":1}],"ts_ms":1700000000123}
//! ```
//!
//! A consumer holds a whole transaction when it has seen `event_count` events with its id (per
//! table: `data_collections`). Transactions with no captured change get no records. Snapshot
//! rows and schema events carry no `transaction` block. Under `--delivery exactly-once` the
//! records are written in the same Kafka transaction as the events they describe.

use serde::{Deserialize, Serialize};

/// A data event's place in its transaction (the envelope's `transaction` block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRef {
    /// `<xid>:<commit LSN>`: unique, also across xid wraparound.
    pub id: String,
    /// 1-based position among the transaction's data events.
    pub total_order: u64,
    /// 1-based position among the transaction's data events of the same table.
    pub data_collection_order: u64,
}

/// `BEGIN` or `END`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Before the transaction's first data event.
    Begin,
    /// After its last.
    End,
}

/// Events of one table in a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCollection {
    /// `schema.table`.
    pub data_collection: String,
    /// Its data events in the transaction.
    pub event_count: u64,
}

/// A record of `<topic>.transactions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRecord {
    /// `BEGIN` or `END`.
    pub status: Status,
    /// The transaction id, as in the events' `transaction.id`.
    pub id: String,
    /// Data events of the transaction (`END` only; `null` on `BEGIN`).
    pub event_count: Option<u64>,
    /// Data events per table (`END` only).
    pub data_collections: Option<Vec<DataCollection>>,
    /// Commit time, ms since the Unix epoch.
    pub ts_ms: i64,
}

/// The id of a transaction: `<xid>:<commit LSN>`.
pub fn transaction_id(xid: u64, commit_lsn: u64) -> String {
    format!("{xid}:{commit_lsn}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_in_debeziums_shape() {
        let begin = TransactionRecord {
            status: Status::Begin,
            id: transaction_id(742, 23_905_744),
            event_count: None,
            data_collections: None,
            ts_ms: 5,
        };
        assert_eq!(
            serde_json::to_string(&begin).expect("json"),
            r#"{"status":"BEGIN","id":"742:23905744","event_count":null,"data_collections":null,"ts_ms":5}"#
        );
        let end = TransactionRecord {
            status: Status::End,
            event_count: Some(1),
            data_collections: Some(vec![DataCollection {
                data_collection: "public.t".into(),
                event_count: 1,
            }]),
            ..begin
        };
        let back: TransactionRecord =
            serde_json::from_str(&serde_json::to_string(&end).expect("json")).expect("parse");
        assert_eq!(back, end);
    }
}
