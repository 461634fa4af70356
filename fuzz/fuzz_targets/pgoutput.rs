//! The pgoutput decoder (`producer/src/replication/pgoutput.rs`) on arbitrary bytes.
//!
//! Properties, beyond "no panic, no out-of-memory":
//! - an error's offset lies inside the message and its text formats;
//! - a decoded message, encoded again the way the server lays it out, decodes to the same
//!   message, and every strict prefix of that encoding is an error (the decoder never reads
//!   past what a field needs, and never accepts a message missing a field).
#![no_main]

use libfuzzer_sys::fuzz_target;
use walrelay_producer::replication::pgoutput::{
    Cell, DecodeError, Message, OldKind, Tuple, decode,
};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Err(e) => check_error(data, &e),
        Ok(msg) => {
            let bytes = encode(&msg);
            assert_eq!(
                decode(&bytes).as_ref(),
                Ok(&msg),
                "re-encoded message decodes differently"
            );
            // Quadratic: only for messages of a sensible size.
            if bytes.len() <= 512 {
                for cut in 0..bytes.len() {
                    assert!(
                        decode(&bytes[..cut]).is_err(),
                        "a {cut}-byte prefix of a {}-byte message decoded",
                        bytes.len()
                    );
                }
            }
        }
    }
});

fn check_error(data: &[u8], e: &DecodeError) {
    let _ = e.to_string();
    match *e {
        DecodeError::Empty => assert!(data.is_empty()),
        DecodeError::UnknownTag(t) => assert_eq!(t, data[0] as char),
        DecodeError::Truncated { offset, needed, .. } => {
            assert!(offset <= data.len(), "offset {offset} past {}", data.len());
            assert!(needed > 0, "truncated but nothing needed");
        }
        DecodeError::UnexpectedMarker { offset, marker, .. } => {
            assert!(
                offset < data.len(),
                "marker offset {offset} past {}",
                data.len()
            );
            assert_eq!(
                data[offset] as char, marker,
                "marker is not the byte at its offset"
            );
        }
        DecodeError::BadString { offset, .. } => {
            assert!(
                offset <= data.len(),
                "string offset {offset} past {}",
                data.len()
            )
        }
    }
}

/// Lays out `msg` as the server does (protocol version 1).
fn encode(msg: &Message<'_>) -> Vec<u8> {
    let mut o = Vec::new();
    match msg {
        Message::Begin {
            final_lsn,
            commit_ts,
            xid,
        } => {
            o.push(b'B');
            o.extend_from_slice(&final_lsn.to_be_bytes());
            o.extend_from_slice(&commit_ts.to_be_bytes());
            o.extend_from_slice(&xid.to_be_bytes());
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
        } => {
            o.push(b'C');
            o.push(*flags);
            o.extend_from_slice(&commit_lsn.to_be_bytes());
            o.extend_from_slice(&end_lsn.to_be_bytes());
            o.extend_from_slice(&commit_ts.to_be_bytes());
        }
        Message::Origin { lsn, name } => {
            o.push(b'O');
            o.extend_from_slice(&lsn.to_be_bytes());
            string(&mut o, name);
        }
        Message::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } => {
            o.push(b'R');
            o.extend_from_slice(&oid.to_be_bytes());
            string(&mut o, namespace);
            string(&mut o, name);
            o.push(*replica_identity);
            o.extend_from_slice(&count16(columns.len()).to_be_bytes());
            for c in columns {
                o.push(u8::from(c.is_key));
                string(&mut o, c.name);
                o.extend_from_slice(&c.type_oid.to_be_bytes());
                o.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        Message::Type {
            oid,
            namespace,
            name,
        } => {
            o.push(b'Y');
            o.extend_from_slice(&oid.to_be_bytes());
            string(&mut o, namespace);
            string(&mut o, name);
        }
        Message::Insert { oid, new } => {
            o.push(b'I');
            o.extend_from_slice(&oid.to_be_bytes());
            o.push(b'N');
            tuple(&mut o, new);
        }
        Message::Update { oid, old, new } => {
            o.push(b'U');
            o.extend_from_slice(&oid.to_be_bytes());
            if let Some((kind, t)) = old {
                o.push(old_marker(*kind));
                tuple(&mut o, t);
            }
            o.push(b'N');
            tuple(&mut o, new);
        }
        Message::Delete { oid, old } => {
            o.push(b'D');
            o.extend_from_slice(&oid.to_be_bytes());
            o.push(old_marker(old.0));
            tuple(&mut o, &old.1);
        }
        Message::Truncate { options, oids } => {
            o.push(b'T');
            let n = i32::try_from(oids.len()).expect("at most i32::MAX relations");
            o.extend_from_slice(&n.to_be_bytes());
            o.push(*options);
            for oid in oids {
                o.extend_from_slice(&oid.to_be_bytes());
            }
        }
        Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            o.push(b'M');
            o.push(u8::from(*transactional));
            o.extend_from_slice(&lsn.to_be_bytes());
            string(&mut o, prefix);
            let n = i32::try_from(content.len()).expect("content fits an i32 length");
            o.extend_from_slice(&n.to_be_bytes());
            o.extend_from_slice(content);
        }
    }
    o
}

fn string(o: &mut Vec<u8>, s: &str) {
    assert!(!s.contains('\0'), "a decoded string holds a NUL");
    o.extend_from_slice(s.as_bytes());
    o.push(0);
}

fn count16(n: usize) -> i16 {
    i16::try_from(n).expect("at most i16::MAX items")
}

fn old_marker(kind: OldKind) -> u8 {
    match kind {
        OldKind::Key => b'K',
        OldKind::Full => b'O',
    }
}

fn tuple(o: &mut Vec<u8>, t: &Tuple<'_>) {
    o.extend_from_slice(&count16(t.0.len()).to_be_bytes());
    for cell in &t.0 {
        match cell {
            Cell::Null => o.push(b'n'),
            Cell::UnchangedToast => o.push(b'u'),
            Cell::Text(v) | Cell::Binary(v) => {
                o.push(if matches!(cell, Cell::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                let n = i32::try_from(v.len()).expect("value fits an i32 length");
                o.extend_from_slice(&n.to_be_bytes());
                o.extend_from_slice(v);
            }
        }
    }
}
