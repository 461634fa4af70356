//! A pure decoder of pgoutput messages (protocol version 1), no I/O.
//!
//! Values are borrowed from the message buffer: a decoded [`Message`] lives as long as the
//! `XLogData` payload it came from. Every malformed input is a [`DecodeError`], which is
//! definite: the same bytes would fail again, so the producer stops instead of skipping.

/// A malformed pgoutput message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ended before a field.
    #[error("pgoutput message {tag:?} is truncated: needed {needed} more bytes at offset {offset}")]
    Truncated {
        /// Message tag.
        tag: char,
        /// Offset of the field.
        offset: usize,
        /// Bytes the field needed.
        needed: usize,
    },
    /// An unknown message tag.
    #[error("unknown pgoutput message tag {0:?}")]
    UnknownTag(char),
    /// An unknown tuple-column kind or tuple marker.
    #[error("pgoutput message {tag:?}: unexpected marker {marker:?} at offset {offset}")]
    UnexpectedMarker {
        /// Message tag.
        tag: char,
        /// The marker byte found.
        marker: char,
        /// Where.
        offset: usize,
    },
    /// A string that is not NUL-terminated or not UTF-8.
    #[error("pgoutput message {tag:?}: bad string at offset {offset}")]
    BadString {
        /// Message tag.
        tag: char,
        /// Where.
        offset: usize,
    },
    /// An empty message.
    #[error("empty pgoutput message")]
    Empty,
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column<'a> {
    /// Part of the replica identity (the key).
    pub is_key: bool,
    /// Column name.
    pub name: &'a str,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// One value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that was not sent.
    UnchangedToast,
    /// Text-format value.
    Text(&'a [u8]),
    /// Binary-format value (only with the `binary` option, which walrelay does not use).
    Binary(&'a [u8]),
}

/// The row data of an Insert, Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple<'a>(pub Vec<Cell<'a>>);

/// Which old row an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: only the replica-identity key columns are meaningful.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Transaction start.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// Transaction end.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End of the commit record: what the slot is confirmed to.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// Replication origin of the transaction.
    Origin {
        /// Origin LSN.
        lsn: u64,
        /// Origin name.
        name: &'a str,
    },
    /// A table's shape, sent before its first change in a session and after it changes.
    Relation {
        /// Table OID.
        oid: u32,
        /// Schema.
        namespace: &'a str,
        /// Table name.
        name: &'a str,
        /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
        replica_identity: u8,
        /// Columns.
        columns: Vec<Column<'a>>,
    },
    /// A non-builtin type used by a following Relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema.
        namespace: &'a str,
        /// Type name.
        name: &'a str,
    },
    /// A row was inserted.
    Insert {
        /// Table OID.
        oid: u32,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A row was updated.
    Update {
        /// Table OID.
        oid: u32,
        /// The old row or key, when the replica identity provides it.
        old: Option<(OldKind, Tuple<'a>)>,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A row was deleted.
    Delete {
        /// Table OID.
        oid: u32,
        /// The old row or key.
        old: (OldKind, Tuple<'a>),
    },
    /// Tables were truncated.
    Truncate {
        /// `1` CASCADE, `2` RESTART IDENTITY.
        options: u8,
        /// Table OIDs.
        oids: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    LogicalMessage {
        /// Emitted inside a transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Prefix.
        prefix: &'a str,
        /// Content.
        content: &'a [u8],
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: char,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(DecodeError::Truncated {
                tag: self.tag,
                offset: self.pos,
                needed: n - (self.buf.len() - self.pos),
            }),
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let bad = DecodeError::BadString {
            tag: self.tag,
            offset: start,
        };
        let nul = rest.iter().position(|b| *b == 0).ok_or(bad.clone())?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| bad)?;
        self.pos = start + nul + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let n = self.i16()?.max(0) as usize;
        let mut cells = Vec::with_capacity(n);
        for _ in 0..n {
            let offset = self.pos;
            let cell = match self.u8()? {
                b'n' => Cell::Null,
                b'u' => Cell::UnchangedToast,
                b't' => {
                    let len = self.i32()?.max(0) as usize;
                    Cell::Text(self.take(len)?)
                }
                b'b' => {
                    let len = self.i32()?.max(0) as usize;
                    Cell::Binary(self.take(len)?)
                }
                other => {
                    return Err(DecodeError::UnexpectedMarker {
                        tag: self.tag,
                        marker: other as char,
                        offset,
                    });
                }
            };
            cells.push(cell);
        }
        Ok(Tuple(cells))
    }

    fn old_tuple(&mut self) -> Result<(OldKind, Tuple<'a>), DecodeError> {
        let offset = self.pos;
        let kind = match self.u8()? {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            other => {
                return Err(DecodeError::UnexpectedMarker {
                    tag: self.tag,
                    marker: other as char,
                    offset,
                });
            }
        };
        Ok((kind, self.tuple()?))
    }

    fn expect(&mut self, marker: u8) -> Result<(), DecodeError> {
        let offset = self.pos;
        let got = self.u8()?;
        if got == marker {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedMarker {
                tag: self.tag,
                marker: got as char,
                offset,
            })
        }
    }
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let tag = *buf.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        buf,
        pos: 1,
        tag: tag as char,
    };
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_ts: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_ts: r.i64()?,
        },
        b'O' => Message::Origin {
            lsn: r.u64()?,
            name: r.string()?,
        },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?.max(0) as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    is_key: flags & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let oid = r.u32()?;
            r.expect(b'N')?;
            Message::Insert {
                oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let oid = r.u32()?;
            let old = match buf.get(r.pos) {
                Some(b'K') | Some(b'O') => Some(r.old_tuple()?),
                _ => None,
            };
            r.expect(b'N')?;
            Message::Update {
                oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => Message::Delete {
            oid: r.u32()?,
            old: r.old_tuple()?,
        },
        b'T' => {
            let n = r.i32()?.max(0) as usize;
            let options = r.u8()?;
            // Take the OIDs' bytes before allocating for them: the count alone once reserved
            // gigabytes for an 11-byte message (found by fuzz/fuzz_targets/pgoutput.rs).
            let oids = r
                .take(n.saturating_mul(4))?
                .chunks_exact(4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Message::Truncate { options, oids }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.string()?;
            let len = r.i32()?.max(0) as usize;
            Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.take(len)?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other as char)),
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds fixtures byte by byte, the way the server lays them out.
    #[derive(Default)]
    struct Fixture(Vec<u8>);

    impl Fixture {
        fn tag(mut self, t: u8) -> Self {
            self.0.push(t);
            self
        }
        fn u8(self, v: u8) -> Self {
            self.tag(v)
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, v: &str) -> Self {
            let mut f = self.tag(b't').i32(v.len() as i32);
            f.0.extend_from_slice(v.as_bytes());
            f
        }
    }

    #[test]
    fn begin_and_commit() {
        let b = Fixture::default()
            .tag(b'B')
            .u64(0x16B3748)
            .u64(757_000_000)
            .i32(742);
        assert_eq!(
            decode(&b.0),
            Ok(Message::Begin {
                final_lsn: 0x16B3748,
                commit_ts: 757_000_000,
                xid: 742
            })
        );
        let c = Fixture::default()
            .tag(b'C')
            .u8(0)
            .u64(0x16B3748)
            .u64(0x16B3778)
            .u64(757_000_000);
        assert_eq!(
            decode(&c.0),
            Ok(Message::Commit {
                flags: 0,
                commit_lsn: 0x16B3748,
                end_lsn: 0x16B3778,
                commit_ts: 757_000_000
            })
        );
    }

    #[test]
    fn relation_with_key_flags() {
        let r = Fixture::default()
            .tag(b'R')
            .i32(16384)
            .s("public")
            .s("users")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .s("id")
            .i32(20)
            .i32(-1)
            .u8(0)
            .s("name")
            .i32(25)
            .i32(-1);
        let Ok(Message::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        }) = decode(&r.0)
        else {
            panic!("not a relation");
        };
        assert_eq!(
            (oid, namespace, name, replica_identity),
            (16384, "public", "users", b'd')
        );
        assert_eq!(
            columns,
            vec![
                Column {
                    is_key: true,
                    name: "id",
                    type_oid: 20,
                    type_modifier: -1
                },
                Column {
                    is_key: false,
                    name: "name",
                    type_oid: 25,
                    type_modifier: -1
                },
            ]
        );
    }

    #[test]
    fn insert_update_delete_tuples() {
        let i = Fixture::default()
            .tag(b'I')
            .i32(16384)
            .tag(b'N')
            .i16(3)
            .text("1")
            .tag(b'n')
            .tag(b'u');
        assert_eq!(
            decode(&i.0),
            Ok(Message::Insert {
                oid: 16384,
                new: Tuple(vec![Cell::Text(b"1"), Cell::Null, Cell::UnchangedToast])
            })
        );
        let u = Fixture::default()
            .tag(b'U')
            .i32(16384)
            .tag(b'K')
            .i16(2)
            .text("1")
            .tag(b'n')
            .tag(b'N')
            .i16(2)
            .text("2")
            .text("x");
        assert_eq!(
            decode(&u.0),
            Ok(Message::Update {
                oid: 16384,
                old: Some((OldKind::Key, Tuple(vec![Cell::Text(b"1"), Cell::Null]))),
                new: Tuple(vec![Cell::Text(b"2"), Cell::Text(b"x")])
            })
        );
        let plain = Fixture::default()
            .tag(b'U')
            .i32(7)
            .tag(b'N')
            .i16(1)
            .text("");
        assert_eq!(
            decode(&plain.0),
            Ok(Message::Update {
                oid: 7,
                old: None,
                new: Tuple(vec![Cell::Text(b"")])
            })
        );
        let d = Fixture::default()
            .tag(b'D')
            .i32(7)
            .tag(b'O')
            .i16(1)
            .text("9");
        assert_eq!(
            decode(&d.0),
            Ok(Message::Delete {
                oid: 7,
                old: (OldKind::Full, Tuple(vec![Cell::Text(b"9")]))
            })
        );
    }

    #[test]
    fn truncate_type_origin_and_message() {
        let t = Fixture::default().tag(b'T').i32(2).u8(1).i32(10).i32(11);
        assert_eq!(
            decode(&t.0),
            Ok(Message::Truncate {
                options: 1,
                oids: vec![10, 11]
            })
        );
        let y = Fixture::default().tag(b'Y').i32(99).s("public").s("mood");
        assert_eq!(
            decode(&y.0),
            Ok(Message::Type {
                oid: 99,
                namespace: "public",
                name: "mood"
            })
        );
        let o = Fixture::default().tag(b'O').u64(5).s("origin1");
        assert_eq!(
            decode(&o.0),
            Ok(Message::Origin {
                lsn: 5,
                name: "origin1"
            })
        );
        let mut m = Fixture::default()
            .tag(b'M')
            .u8(1)
            .u64(77)
            .s("walrelay.ddl")
            .i32(3);
        m.0.extend_from_slice(b"abc");
        assert_eq!(
            decode(&m.0),
            Ok(Message::LogicalMessage {
                transactional: true,
                lsn: 77,
                prefix: "walrelay.ddl",
                content: b"abc"
            })
        );
    }

    #[test]
    fn truncate_count_beyond_the_message_is_an_error_before_any_allocation() {
        // Regression (fuzzing): the relation count was trusted for `Vec::with_capacity`, so
        // this message asked for 8 GiB before failing at its second OID.
        let t = Fixture::default().tag(b'T').i32(i32::MAX).u8(0).i32(10);
        assert_eq!(
            decode(&t.0),
            Err(DecodeError::Truncated {
                tag: 'T',
                offset: 6,
                needed: i32::MAX as usize * 4 - 4
            })
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag('Z')));
        assert!(matches!(
            decode(&[b'B', 0, 0]),
            Err(DecodeError::Truncated { .. })
        ));
        let bad_marker = Fixture::default().tag(b'I').i32(1).tag(b'X');
        assert!(matches!(
            decode(&bad_marker.0),
            Err(DecodeError::UnexpectedMarker { marker: 'X', .. })
        ));
        let bad_len = Fixture::default()
            .tag(b'I')
            .i32(1)
            .tag(b'N')
            .i16(1)
            .tag(b't')
            .i32(100);
        assert!(matches!(
            decode(&bad_len.0),
            Err(DecodeError::Truncated { .. })
        ));
        let unterminated = Fixture::default().tag(b'Y').i32(1).tag(b'a');
        assert!(matches!(
            decode(&unterminated.0),
            Err(DecodeError::BadString { .. })
        ));
        // Every prefix of a valid message fails cleanly.
        let full = Fixture::default()
            .tag(b'U')
            .i32(16384)
            .tag(b'O')
            .i16(1)
            .text("1")
            .tag(b'N')
            .i16(1)
            .text("2");
        for cut in 1..full.0.len() {
            assert!(
                decode(&full.0[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }
}
