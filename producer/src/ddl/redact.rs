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
