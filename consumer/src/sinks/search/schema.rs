//! How schema events change an index.
//!
//! Each column has a stable id (its `attnum`). A column is stored in the field named after it
//! when the index first learned it (its *field*); the index's mapping keeps the id-to-field map
//! in `_meta.walrelay`, so a restarted indexer, or another one, writes the same fields.
//!
//! - added column: a new field, mapped from its logical type;
//! - renamed column: the field stays; the new name becomes a field alias (`"type": "alias"`)
//!   pointing at it, so queries, sorts and aggregations use either name, and rows written under
//!   the new name are stored in the old field (no re-index). `_source` keeps the field's name;
//! - dropped column: its id is retired and nothing writes its field any more (documents keep
//!   the old value until they are next written); a later column may take the name again;
//! - a type the field's mapping cannot take: a conflict (log line, metric); values that the
//!   mapping refuses are dead-lettered item by item. The way out is a re-index: a build index is
//!   seeded with the live index's current columns (current names as fields, current types), so
//!   the rebuilt index has neither aliases nor the old type.
//!
//! A name that another column's field or alias already holds gets the field `<name>__<id>`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use walrelay_common::event::ColumnSchema;

use super::encode::field_mapping;

/// One current column, as the index last learned it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Current {
    /// Current name.
    pub name: String,
    /// Current logical type.
    pub logical: String,
}

/// What an index knows of its table's columns (`_meta.walrelay` of its mapping).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldMap {
    /// Column id to field.
    pub fields: BTreeMap<i32, String>,
    /// The current columns by id.
    #[serde(default)]
    pub current: BTreeMap<i32, Current>,
    /// The last schema version applied.
    pub schema_version: u64,
    /// The table's OID (0 before the first schema event).
    #[serde(default)]
    pub table_oid: u32,
    /// Schema events older than this only map columns the seed did not know (a build seeded
    /// from the live index's current columns).
    #[serde(default)]
    pub seeded_at: u64,
}

/// A conflict found while applying a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// `type_change` or `name_taken` (the metric label).
    pub kind: &'static str,
    /// What happened and the way out.
    pub message: String,
}

/// The mapping update a schema needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The field map afterwards.
    pub next: FieldMap,
    /// Fields and aliases to add to the mapping.
    pub properties: Map<String, Value>,
    /// Conflicts to report.
    pub conflicts: Vec<Conflict>,
}

impl FieldMap {
    /// Reads `_meta` (empty when absent or unreadable: names are fields).
    pub fn from_meta(meta: &Value) -> Self {
        serde_json::from_value(meta["walrelay"].clone()).unwrap_or_default()
    }

    /// The `_meta` to store.
    pub fn to_meta(&self) -> Value {
        json!({ "walrelay": self })
    }

    /// A build's map: every current column of the live index in a field of its current name.
    pub fn seed(live: &FieldMap) -> (Self, Map<String, Value>) {
        let mut seeded = FieldMap {
            seeded_at: live.schema_version,
            table_oid: live.table_oid,
            ..FieldMap::default()
        };
        let mut properties = Map::new();
        for (id, c) in &live.current {
            seeded.fields.insert(*id, c.name.clone());
            seeded.current.insert(*id, c.clone());
            properties.insert(c.name.clone(), field_mapping(&c.logical));
        }
        (seeded, properties)
    }

    /// The renames rows written with `ids` (name to column id) need: name to field, only where
    /// they differ.
    pub fn renames(&self, ids: &HashMap<String, i32>) -> HashMap<String, String> {
        ids.iter()
            .filter_map(|(name, id)| {
                self.fields
                    .get(id)
                    .filter(|f| *f != name)
                    .map(|f| (name.clone(), f.clone()))
            })
            .collect()
    }

    /// Plans applying the schema `columns` at `version` to an index mapped as `mapped`.
    pub fn plan(
        &self,
        table_oid: u32,
        columns: &[ColumnSchema],
        version: u64,
        mapped: &Map<String, Value>,
    ) -> Plan {
        let old_event = version < self.seeded_at;
        let live: Vec<&ColumnSchema> = columns.iter().filter(|c| !c.generated).collect();
        let mut next = FieldMap {
            schema_version: version.max(self.schema_version),
            table_oid,
            seeded_at: self.seeded_at,
            ..FieldMap::default()
        };
        for c in &live {
            if let Some(f) = self.fields.get(&c.id) {
                next.fields.insert(c.id, f.clone());
            }
        }
        if old_event {
            // Keep the seed's columns even when this older schema lacks them.
            for (id, f) in &self.fields {
                next.fields.entry(*id).or_insert_with(|| f.clone());
            }
            next.current = self.current.clone();
        }
        let mut claimed: HashSet<String> = next.fields.values().cloned().collect();
        let mut properties = Map::new();
        let mut conflicts = Vec::new();
        let is_alias = |m: Option<&Value>| m.is_some_and(|m| m["type"] == "alias");
        for c in &live {
            let want = field_mapping(&c.logical);
            let known = next.fields.get(&c.id).cloned();
            let field = match known.clone() {
                Some(f) => f,
                None => {
                    let taken = claimed.contains(&c.name)
                        || is_alias(mapped.get(&c.name))
                        || is_alias(properties.get(&c.name));
                    let f = if taken {
                        let f = format!("{}__{}", c.name, c.id);
                        conflicts.push(Conflict {
                            kind: "name_taken",
                            message: format!(
                                "column {:?} (id {}) cannot use the field {:?}, which another column holds; it is stored as {f:?} until a re-index",
                                c.name, c.id, c.name
                            ),
                        });
                        f
                    } else {
                        c.name.clone()
                    };
                    next.fields.insert(c.id, f.clone());
                    claimed.insert(f.clone());
                    f
                }
            };
            if old_event && known.is_some() {
                continue;
            }
            if !old_event {
                next.current.insert(
                    c.id,
                    Current {
                        name: c.name.clone(),
                        logical: c.logical.clone(),
                    },
                );
            }
            match mapped.get(&field).or(properties.get(&field)) {
                None => {
                    properties.insert(field.clone(), want);
                }
                Some(existing) if existing["type"] != want["type"] => conflicts.push(Conflict {
                    kind: "type_change",
                    message: format!(
                        "column {:?} is now {} (mapping type {}), but its field {field:?} is mapped as {}; values the mapping refuses are dead-lettered. Re-index into a new version (walrelay-consumer reindex) to map it anew",
                        c.name, c.logical, want["type"], existing["type"]
                    ),
                }),
                Some(_) => {}
            }
            if field != c.name {
                let alias = json!({"type": "alias", "path": field});
                match mapped.get(&c.name).or(properties.get(&c.name)) {
                    None => {
                        properties.insert(c.name.clone(), alias);
                    }
                    Some(m) if m["type"] == "alias" => {
                        if m["path"] != json!(field) {
                            properties.insert(c.name.clone(), alias);
                        }
                    }
                    Some(_) => conflicts.push(Conflict {
                        kind: "name_taken",
                        message: format!(
                            "column {:?} was renamed, but {:?} is another column's field, so it cannot alias {field:?}; query {field:?} until a re-index",
                            c.name, c.name
                        ),
                    }),
                }
            }
        }
        Plan {
            next,
            properties,
            conflicts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(id: i32, name: &str, logical: &str) -> ColumnSchema {
        ColumnSchema {
            id,
            name: name.into(),
            type_name: String::new(),
            type_oid: 0,
            logical: logical.into(),
            nullable: true,
            default: None,
            key_position: None,
            generated: false,
            identity: false,
        }
    }

    fn apply(
        map: &FieldMap,
        mapped: &mut Map<String, Value>,
        cols: &[ColumnSchema],
        v: u64,
    ) -> Plan {
        let plan = map.plan(7, cols, v, mapped);
        mapped.extend(plan.properties.clone());
        plan
    }

    #[test]
    fn add_rename_drop_and_reuse() {
        let mut mapped = Map::new();
        let p = apply(
            &FieldMap::default(),
            &mut mapped,
            &[col(1, "id", "integer"), col(2, "a", "text")],
            10,
        );
        assert!(p.conflicts.is_empty());
        assert_eq!(mapped["a"]["type"], "text");
        // Rename a -> b: the field stays, b aliases it; rows' b is written to a.
        let p = apply(
            &p.next,
            &mut mapped,
            &[col(1, "id", "integer"), col(2, "b", "text")],
            20,
        );
        assert_eq!(mapped["b"], json!({"type": "alias", "path": "a"}));
        let ids: HashMap<String, i32> = [("id".to_string(), 1), ("b".to_string(), 2)].into();
        assert_eq!(
            p.next.renames(&ids),
            HashMap::from([("b".to_string(), "a".to_string())])
        );
        // A new column named a cannot take the field a (column 2 holds it).
        let p = apply(
            &p.next,
            &mut mapped,
            &[
                col(1, "id", "integer"),
                col(2, "b", "text"),
                col(3, "a", "integer"),
            ],
            30,
        );
        assert_eq!(p.next.fields[&3], "a__3");
        assert_eq!(p.conflicts[0].kind, "name_taken");
        // Drop b (id 2): its field is free again for a new column named a? No: a__3 keeps it;
        // but a fresh column c after dropping a dropped column's name reuses the field.
        let p = apply(
            &p.next,
            &mut mapped,
            &[col(1, "id", "integer"), col(4, "c", "text")],
            40,
        );
        assert!(!p.next.fields.contains_key(&2) && !p.next.fields.contains_key(&3));
        assert_eq!(p.next.fields[&4], "c");
        // Stale copies of older versions change nothing.
        assert_eq!(p.next.schema_version, 40);
    }

    #[test]
    fn type_change_is_a_conflict_and_a_seeded_build_maps_the_current_type() {
        let mut mapped = Map::new();
        let p = apply(
            &FieldMap::default(),
            &mut mapped,
            &[col(1, "id", "integer"), col(2, "v", "integer")],
            10,
        );
        let p = apply(
            &p.next,
            &mut mapped,
            &[col(1, "id", "integer"), col(2, "v", "text")],
            20,
        );
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].kind, "type_change");
        let p = apply(
            &p.next,
            &mut mapped,
            &[col(1, "id", "integer"), col(2, "w", "text")],
            30,
        );
        // The build: fields are the current names, types the current ones, no aliases.
        let (seed, props) = FieldMap::seed(&p.next);
        assert_eq!(props["w"]["type"], "text");
        assert_eq!(seed.fields[&2], "w");
        let mut build = props;
        let replay = apply(
            &seed,
            &mut build,
            &[col(1, "id", "integer"), col(2, "v", "integer")],
            10,
        );
        assert!(
            replay.conflicts.is_empty() && replay.properties.is_empty(),
            "{replay:?}"
        );
        let ids: HashMap<String, i32> = [("v".to_string(), 2)].into();
        assert_eq!(
            replay.next.renames(&ids)["v"],
            "w",
            "old rows land in the current field"
        );
    }
}
