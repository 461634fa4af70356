//! A stream's query string (`GET /v1/stream?group=G&tables=public.*&from=earliest`), checked
//! before the upgrade: a problem is a 400 whose message names the parameter and the fix.

/// Where a group without committed offsets starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first offset still in the topic: the snapshot and every change since.
    Earliest,
    /// The end: only what is written after the connection opened.
    Latest,
}

impl Start {
    /// librdkafka's `auto.offset.reset` value.
    pub fn reset(self) -> &'static str {
        match self {
            Start::Earliest => "earliest",
            Start::Latest => "latest",
        }
    }
}

/// `schema.table` globs (`*` matches any run of characters), as the producer's `--tables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables(Vec<(String, String)>);

impl Tables {
    /// Every table.
    pub fn all() -> Self {
        Self(vec![("*".into(), "*".into())])
    }

    /// Parses a comma-separated list (empty entries are ignored; an empty list is every table).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.split_once('.') {
                Some((s, t)) if !s.is_empty() && !t.is_empty() && !t.contains('.') => {
                    out.push((s.to_string(), t.to_string()));
                }
                _ => {
                    return Err(format!(
                        "tables: {p:?} is not of the form schema.table; write e.g. \
                         tables=public.orders,sales.* (* matches any characters)"
                    ));
                }
            }
            if out.len() > 100 {
                return Err("tables: at most 100 patterns".into());
            }
        }
        if out.is_empty() {
            return Ok(Self::all());
        }
        Ok(Self(out))
    }

    /// Whether `schema.table` matches a pattern.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.0.iter().any(|(s, t)| {
            glob(s.as_bytes(), schema.as_bytes()) && glob(t.as_bytes(), table.as_bytes())
        })
    }
}

/// `*`-only glob over bytes (UTF-8 text matches as its bytes do), linear backtracking.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// A checked query.
#[derive(Debug, Clone)]
pub struct Query {
    /// The group as the client named it (the Kafka group id adds `--group-prefix`).
    pub group: String,
    /// The tables sent.
    pub tables: Tables,
    /// Where a new group starts.
    pub from: Start,
}

/// Longest group name.
pub const MAX_GROUP_CHARS: usize = 100;

/// Checks a group name: 1-100 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_group(group: &str) -> Result<(), String> {
    if group.is_empty() {
        return Err(
            "group is required: add ?group=<name> (the consumer group that remembers what you \
             acknowledged; reconnect with the same name to resume)"
                .into(),
        );
    }
    if group.len() > MAX_GROUP_CHARS
        || !group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "group: use 1-{MAX_GROUP_CHARS} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl Query {
    /// Parses a raw query string.
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        let (mut group, mut tables, mut from) = (None, None, None);
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let slot = match k.as_ref() {
                "group" => &mut group,
                "tables" => &mut tables,
                "from" => &mut from,
                other => {
                    return Err(format!(
                        "unknown parameter {:?}; the parameters are group (required), tables \
                         and from",
                        other.chars().take(40).collect::<String>()
                    ));
                }
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(format!("{k} is given twice; give it once"));
            }
        }
        let group = group.unwrap_or_default();
        check_group(&group)?;
        let tables = match tables {
            Some(t) => Tables::parse(&t)?,
            None => Tables::all(),
        };
        let from = match from.as_deref() {
            None | Some("earliest") => Start::Earliest,
            Some("latest") => Start::Latest,
            Some(other) => {
                return Err(format!(
                    "from: {:?} is neither earliest nor latest (where a group without \
                     acknowledgements starts)",
                    other.chars().take(40).collect::<String>()
                ));
            }
        };
        Ok(Self {
            group,
            tables,
            from,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked_with_the_fix_in_the_message() {
        let q = Query::parse(Some("group=g1&tables=public.*,sales.order_*&from=latest"))
            .expect("valid");
        assert_eq!(q.group, "g1");
        assert_eq!(q.from, Start::Latest);
        assert!(q.tables.matches("public", "anything"));
        assert!(q.tables.matches("sales", "order_lines"));
        assert!(!q.tables.matches("sales", "customers"));
        let q = Query::parse(Some("group=g")).expect("valid");
        assert_eq!(q.from, Start::Earliest);
        assert!(q.tables.matches("x", "y"));
        for (raw, says) in [
            (None, "group is required"),
            (Some("tables=public.*"), "group is required"),
            (Some("group=a%20b"), "group: use"),
            (Some("group=g&tables=orders"), "schema.table"),
            (Some("group=g&from=now"), "neither earliest nor latest"),
            (Some("group=g&limit=3"), "unknown parameter"),
            (Some("group=g&group=h"), "twice"),
        ] {
            let e = Query::parse(raw).expect_err(says);
            assert!(e.contains(says), "{raw:?}: {e}");
        }
    }

    #[test]
    fn globs_match_like_the_producers() {
        assert!(glob(b"*", b""));
        assert!(glob(b"a*c", b"abbbc"));
        assert!(!glob(b"a*c", b"abbb"));
        assert!(glob(b"*_log", b"audit_log"));
        assert!(!glob(b"orders", b"orders2"));
    }
}
