//! What the sink knows about a table's index: where writes go, the fields mapped so far, and
//! the column-to-field map (see [`super::schema`]).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use walrelay_common::event::Envelope;

use super::schema::FieldMap;

/// A table's index as the sink knows it.
pub(super) struct TableIndex {
    /// Where writes go: the alias (live) or the versioned index (build).
    pub(super) target: String,
    /// Fields mapped so far.
    pub(super) mapped: Map<String, Value>,
    /// The envelope `types` text last checked against `mapped`.
    pub(super) checked_types: String,
    /// Column ids to fields (from the mapping's `_meta`).
    pub(super) columns: FieldMap,
    /// Per `column_ids` text: the renames its rows need (`None`: names are fields).
    pub(super) renames: HashMap<String, Option<Arc<HashMap<String, String>>>>,
}

impl TableIndex {
    pub(super) fn new(target: String, mapped: Map<String, Value>, columns: FieldMap) -> Self {
        Self {
            target,
            mapped,
            checked_types: String::new(),
            columns,
            renames: HashMap::new(),
        }
    }

    /// The renames rows written with `env`'s column ids need.
    pub(super) fn renames_for(&mut self, env: &Envelope) -> Option<Arc<HashMap<String, String>>> {
        if self.columns.fields.is_empty() {
            return None;
        }
        let raw = env.column_ids.raw();
        if let Some(known) = self.renames.get(raw) {
            return known.clone();
        }
        let map = self.columns.renames(&env.column_ids.parse());
        let entry = (!map.is_empty()).then(|| Arc::new(map));
        self.renames.insert(raw.to_string(), entry.clone());
        entry
    }
}
