//! `--ddl-statement redact`: the DDL text of schema events with its secrets replaced, so a
//! `CREATE ROLE … PASSWORD` or a subscription's connection string never reaches Kafka.

/// A DDL statement with its secrets replaced by `***`: the string literal after a `PASSWORD`
/// keyword (`CREATE ROLE … PASSWORD '…'`, `ALTER USER … ENCRYPTED PASSWORD '…'`, `OPTIONS
/// (password '…')`), and the value of `password=` inside any string literal (connection
/// strings of subscriptions and foreign servers).
pub fn redact_statement(sql: &str) -> String {
    let b = sql.as_bytes();
    let word = |i: usize| {
        b.get(i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
    };
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].len() >= 8
            && b[i..i + 8].eq_ignore_ascii_case(b"password")
            && (i == 0 || !word(i - 1))
            && !word(i + 8)
        {
            out.extend_from_slice(&b[i..i + 8]);
            i += 8;
            while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'=') {
                out.push(b[i]);
                i += 1;
            }
            if let Some(end) = literal_end(b, i) {
                out.extend_from_slice(b"'***'");
                i = end;
            }
            continue;
        }
        if let Some(end) = literal_end(b, i) {
            out.extend_from_slice(redact_conninfo(&b[i..end]).as_slice());
            i = end;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| "***".into())
}

/// Whether `sql` holds more than one statement: a `;` outside string literals, quoted
/// identifiers and comments with more than whitespace or comments after it. Postgres gives an
/// event trigger the whole query string, so the text of one statement's schema event would
/// carry every other statement of the query (DDL of tables walrelay does not capture, say):
/// under `--ddl-statement redact` such a text is left out.
pub fn has_several_statements(sql: &str) -> bool {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut seen_semicolon = false;
    while i < b.len() {
        if let Some(end) = literal_end(b, i) {
            if seen_semicolon {
                return true;
            }
            i = end;
            continue;
        }
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|c| *c == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 1;
                i += 2;
                while i < b.len() && depth > 0 {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => {
                if seen_semicolon {
                    return true;
                }
                i += 1;
                while i < b.len() {
                    if b[i] == b'"' && b.get(i + 1) == Some(&b'"') {
                        i += 2;
                    } else if b[i] == b'"' {
                        i += 1;
                        break;
                    } else {
                        i += 1;
                    }
                }
            }
            b';' => {
                seen_semicolon = true;
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                if seen_semicolon {
                    return true;
                }
                i += 1;
            }
        }
    }
    false
}

/// The end of the string literal starting at `i` (`'…'`, `E'…'`, `$tag$…$tag$`), if one does.
fn literal_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'\'' => quoted_end(b, i + 1, false),
        b'e' | b'E'
            if b.get(i + 1) == Some(&b'\'') && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) =>
        {
            quoted_end(b, i + 2, true)
        }
        b'$' => {
            let close = i + 1 + b[i + 1..].iter().position(|c| *c == b'$')?;
            let tag = &b[i..=close];
            if !tag[1..tag.len() - 1]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'_')
            {
                return None;
            }
            let body = close + 1;
            let at = b[body..].windows(tag.len()).position(|w| w == tag)?;
            Some(body + at + tag.len())
        }
        _ => None,
    }
}

fn quoted_end(b: &[u8], mut i: usize, backslash: bool) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    // Unterminated: the rest of the statement is the literal.
    Some(b.len())
}

fn redact_conninfo(lit: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lit.len());
    let mut i = 0;
    while i < lit.len() {
        if lit[i..].len() >= 8 && lit[i..i + 8].eq_ignore_ascii_case(b"password") {
            let mut j = i + 8;
            while j < lit.len() && lit[j] == b' ' {
                j += 1;
            }
            if lit.get(j) == Some(&b'=') {
                out.extend_from_slice(&lit[i..=j]);
                j += 1;
                while j < lit.len() && lit[j] == b' ' {
                    out.push(b' ');
                    j += 1;
                }
                out.extend_from_slice(b"***");
                while j < lit.len() && !lit[j].is_ascii_whitespace() && lit[j] != b'\'' {
                    j += 1;
                }
                i = j;
                continue;
            }
        }
        out.push(lit[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::has_several_statements;

    #[test]
    fn several_statements_are_told_from_one() {
        for one in [
            "ALTER TABLE t ADD COLUMN a int",
            "ALTER TABLE t ADD COLUMN a int;",
            "ALTER TABLE t ADD COLUMN a int; -- done\n  ",
            "ALTER TABLE t ADD COLUMN a text DEFAULT ';x'; /* c; d */",
            "CREATE TABLE \"a;b\" (x text DEFAULT $$;DROP$$)",
            "ALTER TABLE t ADD COLUMN a text DEFAULT E'\\';'",
        ] {
            assert!(!has_several_statements(one), "{one}");
        }
        for several in [
            "ALTER TABLE t ADD COLUMN a int; CREATE TABLE secret (x int)",
            "ALTER TABLE t ADD COLUMN a int;CREATE TABLE s (x int);",
            "ALTER TABLE t ADD COLUMN a int; /* c */ DROP TABLE s",
            "ALTER TABLE t ADD COLUMN a int; \"s\".x",
            "SELECT 1; 'x'",
        ] {
            assert!(has_several_statements(several), "{several}");
        }
    }
}
