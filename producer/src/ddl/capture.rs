//! The SQL side of DDL capture: the catalog function every path shares, the event triggers
//! `init` installs, and what `destroy` removes.
//!
//! `walrelay.table_schema(oid)` describes a table as schema events carry it: per column its
//! `attnum` (the stable id), name, type, nullability, default, key position and generated /
//! identity flags. The event triggers call it inside the DDL's own transaction and emit a
//! transactional logical message (prefix [`MESSAGE_PREFIX`]) with the command tag, the
//! object, the statement and that schema; the message is decoded in commit order with the
//! transaction's rows, so it precedes every row written under the new schema.
//!
//! Each message is followed by an empty `walrelay.ddl.end` message. Logical decoding queues a
//! message at the *end* of its WAL record, which is also where the next record (the user's
//! next row) begins; when the two belong to different (sub)transactions — the trigger's
//! exception block is one, a user's savepoint another — the merge by LSN at commit may put the
//! row first. The marker takes that tie instead, and the schema message stays strictly before.
//!
//! # Only walrelay's triggers can write the channel
//!
//! `pg_logical_emit_message` is executable by every role, so anyone could write a message with
//! walrelay's prefix: a forged drop would delete a table's search index, a malformed one used to
//! stop the producer. Each trigger message is therefore **authenticated**:
//!
//! ```text
//!  init ──32 random bytes──▶ walrelay.ddl_key (REVOKE ALL FROM PUBLIC: owner only)
//!  trigger (SECURITY DEFINER, owner) ──▶ "v1:" hex(HMAC-SHA256(key, xid ":" body)) ":" body
//!  producer (reads the key at start) ──▶ recomputes with the xid of the message's transaction
//! ```
//!
//! A role without walrelay's privileges cannot read the key, so it cannot make a valid MAC;
//! binding the MAC to the transaction id means a valid message cannot be replayed in another
//! transaction either. The producer skips anything in the channel that does not verify, or
//! does not parse: logged (the first in full, then once a minute), counted in
//! `walrelay_producer_errors_total{kind="ddl_rejected"}`, never fatal. A producer whose role
//! cannot read the key accepts no trigger message and derives schema events from Relation
//! messages, as without triggers.
//!
//! `walrelay.capture_ddl` also adds a newly created table to each walrelay publication whose
//! `--tables` patterns (kept in `walrelay.capture_rule`) match it, so a created table is
//! captured from its first row; when a `--row-filter` (kept in `walrelay.capture_filter`)
//! covers it, it is added with that filter, or not at all when the predicate does not fit it. A failure inside the triggers never fails the user's DDL: it
//! raises a warning and the producer's Relation-message fallback sees the change at the next
//! row instead.

/// Prefix of the logical messages the triggers emit.
pub const MESSAGE_PREFIX: &str = "walrelay.ddl";

/// Functions and state every mode uses (idempotent; needs only CREATE on the database).
pub const FUNCTIONS: &str = r#"
CREATE TABLE IF NOT EXISTS walrelay.capture_rule (
    publication text NOT NULL,
    schema_like text NOT NULL,
    table_like text NOT NULL,
    PRIMARY KEY (publication, schema_like, table_like)
);
CREATE TABLE IF NOT EXISTS walrelay.capture_filter (
    publication text NOT NULL,
    pattern text NOT NULL,
    schema_like text NOT NULL,
    table_like text NOT NULL,
    predicate text NOT NULL,
    PRIMARY KEY (publication, pattern)
);
CREATE TABLE IF NOT EXISTS walrelay.schema_history (
    slot_name text NOT NULL,
    relid oid NOT NULL,
    version bigint NOT NULL,
    commit_lsn bigint NOT NULL,
    schema jsonb NOT NULL,
    PRIMARY KEY (slot_name, relid, version)
);
CREATE TABLE IF NOT EXISTS walrelay.ddl_key (
    id int PRIMARY KEY CHECK (id = 1),
    key bytea NOT NULL CHECK (length(key) >= 32)
);
REVOKE ALL ON walrelay.ddl_key FROM PUBLIC;
CREATE OR REPLACE FUNCTION walrelay.hmac_sha256(key bytea, msg bytea) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k bytea := key;
    ipad bytea;
    opad bytea;
BEGIN
    IF length(k) > 64 THEN
        k := sha256(k);
    END IF;
    k := k || decode(repeat('00', 64 - length(k)), 'hex');
    ipad := k;
    opad := k;
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(k, i) # 54);
        opad := set_byte(opad, i, get_byte(k, i) # 92);
    END LOOP;
    RETURN sha256(opad || sha256(ipad || msg));
END
$fn$;
CREATE OR REPLACE FUNCTION walrelay.table_schema(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT jsonb_build_object(
        'table_oid', c.oid::bigint,
        'schema', n.nspname::text,
        'table', c.relname::text,
        'columns', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                'id', a.attnum::int,
                'name', a.attname::text,
                'type', format_type(a.atttypid, a.atttypmod),
                'type_oid', a.atttypid::bigint,
                'nullable', NOT a.attnotnull,
                'default', pg_get_expr(d.adbin, d.adrelid),
                'key_position', (SELECT o.n FROM unnest(k.indkey::int2[]) WITH ORDINALITY o(att, n)
                                 WHERE o.att = a.attnum),
                'generated', a.attgenerated <> '',
                'identity', a.attidentity <> '') ORDER BY a.attnum)
            FROM pg_attribute a
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'::jsonb))
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN LATERAL (
        SELECT i.indkey FROM pg_index i
        WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)
        ORDER BY i.indisprimary DESC LIMIT 1) k ON true
    WHERE c.oid = rel
$fn$;
"#;

/// The event triggers (needs superuser, or ownership of the database on managed services that
/// allow it).
pub const TRIGGERS: &str = r#"
CREATE OR REPLACE FUNCTION walrelay.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    cmd record;
    rel oid;
    seen oid[] := '{}';
    pubs text[];
    rule record;
    body text;
    k bytea;
BEGIN
    SELECT key INTO k FROM walrelay.ddl_key WHERE id = 1;
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.classid <> 'pg_class'::regclass
            OR cmd.object_type NOT IN ('table', 'table column');
        rel := COALESCE(pg_partition_root(cmd.objid), cmd.objid);
        CONTINUE WHEN rel IS NULL OR rel = ANY (seen);
        seen := seen || rel;
        CONTINUE WHEN NOT EXISTS (
            SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
              AND n.nspname NOT IN ('walrelay', 'information_schema')
              AND n.nspname NOT LIKE 'pg\_%');
        BEGIN
            IF cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
                AND rel = cmd.objid THEN
                FOR rule IN
                    SELECT DISTINCT r.publication,
                        (SELECT f.predicate FROM walrelay.capture_filter f
                         WHERE f.publication = r.publication
                           AND n.nspname LIKE f.schema_like AND c.relname LIKE f.table_like
                         ORDER BY f.pattern LIMIT 1) AS predicate
                    FROM walrelay.capture_rule r
                    JOIN pg_publication p ON p.pubname = r.publication AND NOT p.puballtables
                    JOIN pg_class c ON c.oid = rel
                    JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname LIKE r.schema_like AND c.relname LIKE r.table_like
                      AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                                      WHERE pr.prpubid = p.oid AND pr.prrelid = rel)
                LOOP
                    -- A table a --row-filter covers is added with its filter, or not at all
                    -- (a predicate that does not fit it fails here: the warning below says so).
                    IF rule.predicate IS NULL THEN
                        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', rule.publication, rel::regclass);
                    ELSE
                        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s WHERE (%s)', rule.publication, rel::regclass, rule.predicate);
                    END IF;
                END LOOP;
            END IF;
            SELECT array_agg(DISTINCT pt.pubname::text) INTO pubs
            FROM pg_publication_tables pt
            JOIN pg_class c ON c.oid = rel
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE pt.schemaname = n.nspname AND pt.tablename = c.relname;
            CONTINUE WHEN pubs IS NULL;
            body := jsonb_build_object(
                'command', cmd.command_tag,
                'object', cmd.object_identity,
                'sql', current_query(),
                'publications', to_jsonb(pubs),
                'dropped', false,
                'table', walrelay.table_schema(rel))::text;
            PERFORM pg_logical_emit_message(true, 'walrelay.ddl', 'v1:' || encode(walrelay.hmac_sha256(k,
                convert_to((txid_current() % 4294967296)::text || ':' || body, 'UTF8')), 'hex') || ':' || body);
            PERFORM pg_logical_emit_message(true, 'walrelay.ddl.end', '');
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'walrelay could not capture % on %: % (the producer falls back to Relation messages for it)',
                cmd.command_tag, cmd.object_identity, SQLERRM;
        END;
    END LOOP;
END
$fn$;
CREATE OR REPLACE FUNCTION walrelay.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    obj record;
    body text;
    k bytea;
BEGIN
    SELECT key INTO k FROM walrelay.ddl_key WHERE id = 1;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type = 'table' LOOP
        BEGIN
            body := jsonb_build_object(
                'command', tg_tag,
                'object', obj.object_identity,
                'sql', current_query(),
                'publications', '[]'::jsonb,
                'dropped', true,
                'table', jsonb_build_object('table_oid', obj.objid::bigint, 'schema', obj.schema_name,
                                            'table', obj.object_name, 'columns', '[]'::jsonb))::text;
            PERFORM pg_logical_emit_message(true, 'walrelay.ddl', 'v1:' || encode(walrelay.hmac_sha256(k,
                convert_to((txid_current() % 4294967296)::text || ':' || body, 'UTF8')), 'hex') || ':' || body);
            PERFORM pg_logical_emit_message(true, 'walrelay.ddl.end', '');
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'walrelay could not capture the drop of %: %', obj.object_identity, SQLERRM;
        END;
    END LOOP;
END
$fn$;
DROP EVENT TRIGGER IF EXISTS walrelay_ddl;
CREATE EVENT TRIGGER walrelay_ddl ON ddl_command_end EXECUTE FUNCTION walrelay.capture_ddl();
DROP EVENT TRIGGER IF EXISTS walrelay_drop;
CREATE EVENT TRIGGER walrelay_drop ON sql_drop EXECUTE FUNCTION walrelay.capture_drop();
"#;

/// Removes the event triggers and their functions (when the last slot is destroyed).
pub const REMOVE_TRIGGERS: &str = "
DROP EVENT TRIGGER IF EXISTS walrelay_ddl;
DROP EVENT TRIGGER IF EXISTS walrelay_drop;
DROP FUNCTION IF EXISTS walrelay.capture_ddl();
DROP FUNCTION IF EXISTS walrelay.capture_drop();
";

/// Whether both event triggers are installed and enabled.
pub const TRIGGERS_ACTIVE: &str = "SELECT count(*) = 2 FROM pg_event_trigger \
     WHERE evtname IN ('walrelay_ddl', 'walrelay_drop') AND evtenabled <> 'D'";

/// What is lost without the triggers, for `check` and logs.
pub const WITHOUT_TRIGGERS: &str = "without them walrelay derives schema events from pgoutput's Relation \
     messages at the next row written to a changed table: a DDL on a table nobody writes to is not seen, \
     several DDLs between two rows arrive as one schema event without the DDL text, a dropped table \
     emits no event, and tables created later are not added to the publication";

/// A `*` glob as a SQL LIKE pattern.
pub fn like_pattern(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len());
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_like_patterns() {
        assert_eq!(like_pattern("order_*"), "order\\_%");
        assert_eq!(like_pattern("*"), "%");
        assert_eq!(like_pattern("100%"), "100\\%");
    }
}
