//! The snapshot's COPY text-format line parser (`producer/src/snapshot.rs`, `parse_copy_line`).
//!
//! Two properties on every input:
//! 1. The input as one line (it never holds the line's `\n`): at least one field, at most one
//!    more than its tabs; the fields' ranges lie in `scratch`, in order, back to back, covering
//!    it; unescaping never grows the text; a line without backslashes splits exactly on tabs;
//!    reused (dirty) buffers give the same answer.
//! 2. The input as a list of fields (split on 0xFF; a lone 0xFE stands for NULL), written the
//!    way Postgres' `COPY ... TO STDOUT` writes them: parsing that line gives the fields back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walrelay_producer::snapshot::parse_copy_line;

type Fields = Vec<Option<Vec<u8>>>;

fuzz_target!(|data: &[u8]| {
    let line = match data.iter().position(|b| *b == b'\n') {
        Some(nl) => &data[..nl],
        None => data,
    };
    let (mut scratch, mut ranges) = (Vec::new(), Vec::new());
    parse_copy_line(line, &mut scratch, &mut ranges);
    let fields = collect(&scratch, &ranges);

    let tabs = line.iter().filter(|b| **b == b'\t').count();
    assert!(!ranges.is_empty(), "no field");
    assert!(
        ranges.len() <= tabs + 1,
        "{} fields from {tabs} tabs",
        ranges.len()
    );
    assert!(scratch.len() <= line.len(), "unescaping grew the line");
    let mut end = 0;
    for (a, b) in ranges.iter().flatten() {
        assert_eq!(*a, end, "fields are not back to back");
        assert!(
            a <= b && *b <= scratch.len(),
            "range {a}..{b} outside scratch"
        );
        end = *b;
    }
    assert_eq!(end, scratch.len(), "scratch holds bytes no field covers");
    if !line.contains(&b'\\') {
        let plain: Fields = line
            .split(|b| *b == b'\t')
            .map(|f| Some(f.to_vec()))
            .collect();
        assert_eq!(fields, plain, "a line without escapes is not split on tabs");
    }

    // Dirty buffers: the parser must clear them.
    scratch.extend_from_slice(b"left over");
    ranges.push(Some((0, 1)));
    parse_copy_line(line, &mut scratch, &mut ranges);
    assert_eq!(
        collect(&scratch, &ranges),
        fields,
        "reused buffers changed the answer"
    );

    // Round trip through Postgres' own escaping.
    let wanted: Fields = data
        .split(|b| *b == 0xFF)
        .map(|f| (f != [0xFE]).then(|| f.to_vec()))
        .collect();
    let written = copy_out_line(&wanted);
    assert!(!written.contains(&b'\n'), "COPY line holds a raw newline");
    parse_copy_line(&written, &mut scratch, &mut ranges);
    assert_eq!(
        collect(&scratch, &ranges),
        wanted,
        "line {:?} does not parse back",
        String::from_utf8_lossy(&written)
    );
});

fn collect(scratch: &[u8], ranges: &[Option<(usize, usize)>]) -> Fields {
    ranges
        .iter()
        .map(|r| r.map(|(a, b)| scratch[a..b].to_vec()))
        .collect()
}

/// One row as `COPY ... TO STDOUT` (text format, tab delimiter, `\N` for NULL) writes it,
/// without the trailing newline: `CopyAttributeOutText` escapes backslash, the delimiter and
/// the C escapes `\b \f \n \r \t \v`; every other byte goes out as it is.
fn copy_out_line(fields: &Fields) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        let Some(f) = f else {
            out.extend_from_slice(b"\\N");
            continue;
        };
        for &c in f {
            let esc = match c {
                b'\\' => b'\\',
                b'\t' => b't',
                b'\n' => b'n',
                b'\r' => b'r',
                8 => b'b',
                12 => b'f',
                11 => b'v',
                _ => {
                    out.push(c);
                    continue;
                }
            };
            out.push(b'\\');
            out.push(esc);
        }
    }
    out
}
