//! The checker: what each component should have, from Postgres, against what it has.
//!
//! Independent of the producer's code: envelopes are parsed here as plain JSON (`op`,
//! `source.table`, `source.commit_lsn`, `ts_ms`, `before`, `after`, `unchanged_toast`), and
//! truth is the workload's plans of the transactions the `chaos_tx` ledger holds.
//!
//! Rules (a component fails on any of them):
//! - **missing**: an expected event never seen; **extra**: an event seen that no committed
//!   transaction wrote (an uncommitted transaction's, a snapshot row, an unknown table's);
//! - **out of order**: per key (and per subscription or client), the first copies of its
//!   events not in increasing version order;
//! - **duplicates**: exactly-once: none; the at-least-once topic: only inside the unconfirmed
//!   window (an event's extra copies are at most the number of producer session breaks whose
//!   slot position was at or below its commit LSN); at-least-once consumers: counted;
//! - **state**: the table state rebuilt from the topic, the index and the target database
//!   differ from Postgres in no row (compared on the columns Postgres has now).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value};

use super::faults::Done;
use super::{Ev, Op, Table};

/// One envelope, parsed.
#[derive(Debug)]
pub enum Parsed {
    /// A row change.
    Row {
        /// Its identity.
        ev: Ev,
        /// Commit time, ms.
        ts_ms: i64,
        /// Commit LSN.
        commit_lsn: u64,
        /// The row after (inserts, updates, snapshot rows).
        after: Option<Map<String, Value>>,
        /// Columns left unchanged in TOAST.
        unchanged: Vec<String>,
    },
    /// A truncate of `table` (its transaction found by commit LSN later).
    Truncate {
        /// Table.
        table: Table,
        /// Commit time, ms.
        ts_ms: i64,
        /// Commit LSN.
        commit_lsn: u64,
    },
    /// Schema events and snapshot markers: not change events.
    Other,
    /// Not an envelope of a workload table: an extra event, described.
    Bad(String),
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Parses one record's value.
pub fn parse(bytes: &[u8]) -> Parsed {
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Parsed::Bad(format!("not JSON: {e}")),
    };
    let op = v["op"].as_str().unwrap_or("");
    let table_name = v["source"]["table"].as_str().unwrap_or("");
    let ts_ms = v["ts_ms"].as_i64().unwrap_or(0);
    let commit_lsn = v["source"]["commit_lsn"].as_u64().unwrap_or(0);
    if matches!(op, "ddl" | "snapshot_start" | "snapshot_end")
        || table_name == super::workload::SEED_TABLE
    {
        return Parsed::Other;
    }
    let Some(table) = Table::from_name(table_name) else {
        return Parsed::Bad(format!("{op} event of unknown table {table_name:?}"));
    };
    if op == "t" {
        return Parsed::Truncate {
            table,
            ts_ms,
            commit_lsn,
        };
    }
    let op = match op {
        "c" => Op::Create,
        "u" => Op::Update,
        "d" => Op::Delete,
        "r" => Op::Read,
        other => return Parsed::Bad(format!("unknown op {other:?} on {table_name}")),
    };
    let image = if op == Op::Delete {
        &v["before"]
    } else {
        &v["after"]
    };
    let (Some(key), Some(version)) = (int(&image["id"]), int(&image["version"])) else {
        return Parsed::Bad(format!(
            "{} event of {table_name} without id or version",
            op.letter()
        ));
    };
    let unchanged = v["unchanged_toast"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Parsed::Row {
        ev: Ev {
            table,
            key,
            op,
            version,
        },
        ts_ms,
        commit_lsn,
        after: v["after"].as_object().cloned(),
        unchanged,
    }
}

/// One observed event.
#[derive(Debug, Clone, Copy)]
pub struct Obs {
    /// Identity (a truncate's version is filled in by [`resolve_truncates`]).
    pub ev: Ev,
    /// Where its order counts: the subscription of a webhook, else 0.
    pub stream: u32,
    /// When it was seen, ms since the epoch.
    pub arrival_ms: i64,
    /// Its commit time, ms.
    pub ts_ms: i64,
    /// Its commit LSN.
    pub commit_lsn: u64,
}

/// Gives truncates their transaction's ledger id through the commit LSN of the ledger row's
/// insert (`lsn_tx`); an unknown one gets -1 (an extra event).
pub fn resolve_truncates(obs: &mut [Obs], lsn_tx: &HashMap<u64, i64>) {
    for o in obs {
        if o.ev.op == Op::Truncate {
            o.ev.version = lsn_tx.get(&o.commit_lsn).copied().unwrap_or(-1);
        }
    }
}

/// How duplicates are judged.
#[derive(Debug, Clone)]
pub enum DupPolicy {
    /// None allowed.
    None,
    /// Only inside the unconfirmed window: the slot's positions after each session break.
    Window(Vec<u64>),
    /// Counted, allowed (at-least-once consumers).
    Allowed,
}

/// Events of one component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventCheck {
    /// Component.
    pub name: String,
    /// Events expected.
    pub expected: usize,
    /// Events received, copies included.
    pub received: usize,
    /// Expected events never seen.
    pub missing: usize,
    /// Distinct events seen that no committed transaction wrote.
    pub extra: usize,
    /// Copies beyond the first.
    pub duplicates: usize,
    /// Copies beyond what the policy allows.
    pub duplicates_not_allowed: usize,
    /// The duplicate rule applied.
    pub duplicate_rule: String,
    /// First copies out of version order for their key.
    pub out_of_order: usize,
    /// Largest commit → seen, ms (first copies).
    pub max_latency_ms: i64,
    /// A few missing, extra, misordered, disallowed duplicates.
    pub samples: Vec<String>,
    /// No missing, extra, misordered event, no disallowed duplicate, something expected.
    pub pass: bool,
}

/// Checks one component's observations (in arrival order) against `expected`.
pub fn check_events(
    name: &str,
    expected: &HashSet<Ev>,
    obs: &[Obs],
    policy: &DupPolicy,
) -> EventCheck {
    let mut copies: HashMap<Ev, (usize, u64)> = HashMap::new();
    // A delete carries the version it removed, the same as the change before it: it ranks
    // after that change.
    let rank = |e: &Ev| (e.version, u8::from(e.op == Op::Delete));
    let mut last_version: HashMap<(u32, Table, i64), (i64, u8)> = HashMap::new();
    let mut first_seen: HashSet<(u32, Ev)> = HashSet::new();
    let mut out_of_order = 0;
    let mut samples = Vec::new();
    let mut max_latency_ms = 0;
    for o in obs {
        let entry = copies.entry(o.ev).or_insert((0, o.commit_lsn));
        entry.0 += 1;
        if !first_seen.insert((o.stream, o.ev)) {
            continue;
        }
        max_latency_ms = max_latency_ms.max(o.arrival_ms - o.ts_ms);
        if o.ev.op == Op::Truncate {
            continue;
        }
        let k = (o.stream, o.ev.table, o.ev.key);
        let r = rank(&o.ev);
        if let Some(prev) = last_version.get(&k)
            && r <= *prev
        {
            out_of_order += 1;
            if samples.len() < 12 {
                samples.push(format!(
                    "out of order: {} (stream {}) after version {}{}",
                    o.ev,
                    o.stream,
                    prev.0,
                    if prev.1 == 1 { " (deleted)" } else { "" }
                ));
            }
        }
        let newest = last_version.get(&k).map_or(r, |p| (*p).max(r));
        last_version.insert(k, newest);
    }
    let mut missing: Vec<&Ev> = expected
        .iter()
        .filter(|e| !copies.contains_key(e))
        .collect();
    missing.sort();
    let mut extra: Vec<&Ev> = copies.keys().filter(|e| !expected.contains(e)).collect();
    extra.sort();
    for e in missing.iter().take(5) {
        samples.push(format!("missing: {e}"));
    }
    for e in extra.iter().take(5) {
        samples.push(format!("extra: {e}"));
    }
    // Copies per event beyond one; a webhook delivered to two subscriptions is not a
    // duplicate (the stream number tells them apart).
    let per_stream: HashMap<Ev, usize> = {
        let mut m: HashMap<Ev, HashSet<u32>> = HashMap::new();
        for o in obs {
            m.entry(o.ev).or_default().insert(o.stream);
        }
        m.into_iter().map(|(e, s)| (e, s.len())).collect()
    };
    let mut duplicates = 0;
    let mut not_allowed = 0;
    for (ev, (n, lsn)) in &copies {
        let streams = per_stream.get(ev).copied().unwrap_or(1);
        let extra_copies = n.saturating_sub(streams);
        duplicates += extra_copies;
        let allowed = match policy {
            DupPolicy::None => 0,
            DupPolicy::Allowed => usize::MAX,
            DupPolicy::Window(breaks) => breaks.iter().filter(|c| **c <= *lsn).count(),
        };
        if extra_copies > allowed {
            not_allowed += extra_copies - allowed;
            if samples.len() < 20 {
                samples.push(format!(
                    "duplicate not allowed: {ev} ({n} copies, commit LSN {lsn}, {allowed} allowed)"
                ));
            }
        }
    }
    let rule = match policy {
        DupPolicy::None => "none allowed (exactly-once)".to_string(),
        DupPolicy::Window(b) => {
            format!("inside the unconfirmed window ({} session breaks)", b.len())
        }
        DupPolicy::Allowed => "allowed (at-least-once delivery)".to_string(),
    };
    EventCheck {
        name: name.to_string(),
        expected: expected.len(),
        received: obs.len(),
        missing: missing.len(),
        extra: extra.len(),
        duplicates,
        duplicates_not_allowed: not_allowed,
        duplicate_rule: rule,
        out_of_order,
        max_latency_ms,
        samples,
        pass: missing.is_empty()
            && extra.is_empty()
            && out_of_order == 0
            && not_allowed == 0
            && !expected.is_empty(),
    }
}

/// The expected events of `tables` among the committed transactions' plans.
pub fn expected_of(events: &[Ev], tables: &[Table]) -> HashSet<Ev> {
    events
        .iter()
        .filter(|e| tables.contains(&e.table))
        .copied()
        .collect()
}

/// Rows by table and key.
pub type Rows = BTreeMap<(Table, i64), Map<String, Value>>;

/// A final state against Postgres.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StateCheck {
    /// Component.
    pub name: String,
    /// Rows Postgres has.
    pub rows: usize,
    /// Rows Postgres has that the component lacks.
    pub missing: usize,
    /// Rows the component has that Postgres does not.
    pub extra: usize,
    /// Rows whose values differ (on Postgres' columns).
    pub differing: usize,
    /// A few of each.
    pub samples: Vec<String>,
    /// All zero.
    pub pass: bool,
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…({} chars)",
            s.chars().take(60).collect::<String>(),
            s.len()
        )
    } else {
        s
    }
}

/// Compares `seen` with Postgres' `truth`, column by column over Postgres' columns (a column
/// the component lacks counts as null: a column added later is null in rows not written
/// since).
pub fn compare_state(name: &str, truth: &Rows, seen: &Rows) -> StateCheck {
    let mut samples = Vec::new();
    let mut missing = 0;
    let mut differing = 0;
    for (k, row) in truth {
        let Some(other) = seen.get(k) else {
            missing += 1;
            if samples.len() < 6 {
                samples.push(format!("missing: {} id={}", k.0.name(), k.1));
            }
            continue;
        };
        let diff: Vec<String> = row
            .iter()
            .filter(|(col, v)| other.get(*col).unwrap_or(&Value::Null) != *v)
            .map(|(col, v)| {
                format!(
                    "{col}: postgres {} / {name} {}",
                    short(v),
                    short(other.get(col).unwrap_or(&Value::Null))
                )
            })
            .collect();
        if !diff.is_empty() {
            differing += 1;
            if samples.len() < 12 {
                samples.push(format!(
                    "differs: {} id={}: {}",
                    k.0.name(),
                    k.1,
                    diff.join("; ")
                ));
            }
        }
    }
    let extra_keys: Vec<_> = seen.keys().filter(|k| !truth.contains_key(k)).collect();
    for k in extra_keys.iter().take(5) {
        samples.push(format!("extra: {} id={}", k.0.name(), k.1));
    }
    StateCheck {
        name: name.to_string(),
        rows: truth.len(),
        missing,
        extra: extra_keys.len(),
        differing,
        samples,
        pass: missing == 0 && extra_keys.is_empty() && differing == 0,
    }
}

/// Recovery after each fault: from its injection to the first moment the component showed a
/// change committed after it, ms. `seen` is (commit time, seen time) pairs.
pub fn recoveries(seen: &[(i64, i64)], faults: &[Done]) -> Vec<(String, Option<i64>)> {
    // By commit time, with the earliest sighting of anything committed at or after each.
    let mut by_commit: Vec<(i64, i64)> = seen.to_vec();
    by_commit.sort_unstable();
    let mut suffix_min = vec![i64::MAX; by_commit.len() + 1];
    for i in (0..by_commit.len()).rev() {
        suffix_min[i] = suffix_min[i + 1].min(by_commit[i].1);
    }
    faults
        .iter()
        .map(|f| {
            let i = by_commit.partition_point(|(c, _)| *c < f.at_ms);
            let first = suffix_min[i];
            (
                f.kind.label(),
                (first != i64::MAX).then(|| (first - f.at_ms).max(0)),
            )
        })
        .collect()
}

/// Staleness of a polled heartbeat: for each poll at `t` that saw beat `b`, how long a newer
/// committed beat had been waiting (the poll's lag); the largest.
pub fn heartbeat_lag(polls: &[(i64, i64)], beats: &[i64]) -> i64 {
    let mut beats = beats.to_vec();
    beats.sort_unstable();
    polls
        .iter()
        .filter_map(|(t, b)| {
            let i = beats.partition_point(|x| x <= b);
            beats
                .get(i)
                .filter(|next| **next <= *t)
                .map(|next| t - next)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: i64, version: i64) -> Ev {
        Ev {
            table: Table::Items,
            key,
            op: Op::Update,
            version,
        }
    }

    fn obs(e: Ev, lsn: u64) -> Obs {
        Obs {
            ev: e,
            stream: 0,
            arrival_ms: 10,
            ts_ms: 5,
            commit_lsn: lsn,
        }
    }

    #[test]
    fn missing_extra_reordered_and_duplicates_are_caught() {
        let del = Ev {
            op: Op::Delete,
            ..ev(2, 1)
        };
        let ordered = [obs(ev(2, 1), 1), obs(del, 2)];
        let both: HashSet<Ev> = [ev(2, 1), del].into_iter().collect();
        assert!(check_events("t", &both, &ordered, &DupPolicy::None).pass);
        let reversed = [obs(del, 2), obs(ev(2, 1), 1)];
        assert!(!check_events("t", &both, &reversed, &DupPolicy::None).pass);
        let expected: HashSet<Ev> = [ev(1, 1), ev(1, 2), ev(2, 1)].into_iter().collect();
        let ok = [obs(ev(1, 1), 10), obs(ev(1, 2), 20), obs(ev(2, 1), 30)];
        assert!(check_events("t", &expected, &ok, &DupPolicy::None).pass);
        let reordered = [obs(ev(1, 2), 20), obs(ev(1, 1), 10), obs(ev(2, 1), 30)];
        let r = check_events("t", &expected, &reordered, &DupPolicy::None);
        assert_eq!((r.out_of_order, r.pass), (1, false));
        let missing = [obs(ev(1, 1), 10), obs(ev(2, 1), 30), obs(ev(3, 1), 40)];
        let r = check_events("t", &expected, &missing, &DupPolicy::Allowed);
        assert_eq!((r.missing, r.extra, r.pass), (1, 1, false));
        // A replayed suffix: allowed only inside the window.
        let replay = [
            obs(ev(1, 1), 10),
            obs(ev(1, 2), 20),
            obs(ev(1, 2), 20),
            obs(ev(2, 1), 30),
        ];
        let r = check_events("t", &expected, &replay, &DupPolicy::None);
        assert_eq!((r.duplicates, r.out_of_order, r.pass), (1, 0, false));
        assert!(check_events("t", &expected, &replay, &DupPolicy::Window(vec![15])).pass);
        assert!(!check_events("t", &expected, &replay, &DupPolicy::Window(vec![25])).pass);
    }

    #[test]
    fn envelopes_are_parsed_without_walrelay_types() {
        let d = br#"{"op":"d","before":{"id":7,"version":3,"tx":1},"after":null,
            "source":{"table":"items","commit_lsn":99},"ts_ms":5}"#;
        match parse(d) {
            Parsed::Row { ev, commit_lsn, .. } => {
                assert_eq!(
                    (ev.key, ev.op, ev.version, commit_lsn),
                    (7, Op::Delete, 3, 99)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(br#"{"op":"ddl","source":{"table":"scratch"}}"#),
            Parsed::Other
        ));
        assert!(matches!(parse(b"nope"), Parsed::Bad(_)));
    }

    #[test]
    fn state_differences_are_named() {
        let mut truth = Rows::new();
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"id":1,"version":2,"extra_1":null}"#).expect("json");
        truth.insert((Table::Items, 1), row.clone());
        let mut seen = Rows::new();
        seen.insert(
            (Table::Items, 1),
            serde_json::from_str(r#"{"id":1,"version":2,"dropped":5}"#).expect("json"),
        );
        assert!(compare_state("x", &truth, &seen).pass);
        seen.insert(
            (Table::Items, 1),
            serde_json::from_str(r#"{"id":1,"version":1}"#).expect("json"),
        );
        seen.insert((Table::Items, 2), row);
        let c = compare_state("x", &truth, &seen);
        assert_eq!((c.differing, c.extra, c.pass), (1, 1, false));
    }
}
