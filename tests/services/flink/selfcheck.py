#!/usr/bin/env python3
"""Produce the self-check's change events, shaped as walrelay writes them.

  selfcheck.py json BOOTSTRAP TOPIC
  selfcheck.py avro BOOTSTRAP TOPIC REGISTRY_URL
  selfcheck.py avro-millis BOOTSTRAP TOPIC REGISTRY_URL

json: walrelay's JSON (numeric as a string, timestamp as ISO 8601); read it
as `updated TIMESTAMP(6)` with debezium-json.timestamp-format.standard=ISO-8601.
avro: the Avro layout walrelay writes (timestamp-micros, i.e. Debezium's
io.debezium.time.MicroTimestamp); read it as `updated BIGINT` (Flink reads
a timestamp long as milliseconds whatever its logical type, see README.md).
avro-millis: the same layout with timestamp-millis
(org.apache.kafka.connect.data.Timestamp, Debezium's time.precision.mode=connect);
read it as `updated TIMESTAMP(3)`.

Both write the same history of table public.items (snapshot reads, insert,
updates with before images, deletes each followed by a tombstone) to TOPIC,
in one Kafka transaction (the harness reads read_committed), then print the
table that history leaves, as `flink.sh run` prints it. Needs the
confluent-kafka and fastavro packages (selfcheck.sh makes a venv).
"""
import io
import json
import struct
import sys
import urllib.request
from decimal import Decimal

from confluent_kafka import Producer

# (id, name, price, updated): price a decimal string or None; updated
# microseconds since the epoch (timestamp without time zone, as UTC) or None.
A1 = (1, "a", "1.50", 1704164645123456)  # 2024-01-02T03:04:05.123456
B2 = (2, "b", "2.00", None)
C3 = (3, 'c"q\u00e9', "99999999.99", -1)  # 1969-12-31T23:59:59.999999
A1u = (1, "a2", "2.50", 1706832000000001)  # 2024-02-02T00:00:00.000001
D4 = (4, None, None, None)
C3u = (3, "c3", "-0.01", 0)  # 1970-01-01T00:00:00.000000

HISTORY = [  # (op, before, after, snapshot)
    ("r", None, A1, "true"),
    ("r", None, B2, "last"),
    ("c", None, C3, "false"),
    ("u", A1, A1u, "false"),
    ("d", B2, None, "false"),
    ("c", None, D4, "false"),
    ("u", C3, C3u, "false"),
    ("d", D4, None, "false"),
]
FINAL = [A1u, C3u]


def iso_micros(us, digits=6):
    if us is None:
        return None
    from datetime import datetime, timedelta, timezone
    if digits == 3:
        us = us // 1000 * 1000
    t = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:20 + digits]


def source(lsn, snapshot):
    return {"version": "0.1.0", "connector": "walrelay", "name": "app", "ts_ms": 8,
            "snapshot": snapshot, "db": "app", "sequence": '[null,"%d"]' % lsn,
            "schema": "public", "table": "items", "txId": 7, "lsn": lsn, "xmin": None}


# ------------------------------------------------------------------- JSON ---

def json_row(r):
    if r is None:
        return None
    # walrelay's JSON: numeric as an exact string, timestamp as ISO 8601.
    return {"id": r[0], "name": r[1], "price": r[2], "updated": iso_micros(r[3])}


def json_events():
    for lsn, (op, before, after, snap) in enumerate(HISTORY, 1):
        src = source(lsn, snap)
        src.update({"commit_lsn": lsn + 1, "txid": 7, "seq": 1})
        value = {"op": op, "before": json_row(before), "after": json_row(after), "source": src,
                 "ts_ms": 8, "key": ["id"],
                 "types": {"id": "integer", "name": "text", "price": "numeric",
                           "updated": "timestamp"},
                 "schema_version": 1,
                 "column_ids": {"id": 1, "name": 2, "price": 3, "updated": 4}}
        key = json.dumps({"id": (after or before)[0]}).encode()
        yield key, json.dumps(value).encode()
        if op == "d":
            yield key, None


# ------------------------------------------------------------------- Avro ---

TIMESTAMP_MICROS = {"type": "long", "logicalType": "timestamp-micros",
                    "connect.name": "io.debezium.time.MicroTimestamp"}
TIMESTAMP_MILLIS = {"type": "long", "logicalType": "timestamp-millis",
                    "connect.name": "org.apache.kafka.connect.data.Timestamp"}

VALUE_SCHEMA = {
    "type": "record", "name": "Envelope", "namespace": "app.public.items", "fields": [
        {"name": "before", "type": ["null", {
            "type": "record", "name": "Value", "fields": [
                {"name": "id", "type": "long"},
                {"name": "name", "type": ["null", "string"], "default": None},
                {"name": "price", "type": ["null", {
                    "type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2,
                    "connect.name": "org.apache.kafka.connect.data.Decimal",
                    "connect.parameters": {"scale": "2", "connect.decimal.precision": "10"}}],
                 "default": None},
                {"name": "updated", "type": ["null", TIMESTAMP_MICROS], "default": None},
            ], "connect.name": "app.public.items.Value"}], "default": None},
        {"name": "after", "type": ["null", "Value"], "default": None},
        {"name": "source", "type": {
            "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
            "fields": [
                {"name": "version", "type": "string"},
                {"name": "connector", "type": "string"},
                {"name": "name", "type": "string"},
                {"name": "ts_ms", "type": "long"},
                {"name": "snapshot", "type": [{
                    "type": "string", "connect.name": "io.debezium.data.Enum",
                    "connect.parameters": {"allowed": "true,last,false,incremental"}}, "null"],
                 "default": "false"},
                {"name": "db", "type": "string"},
                {"name": "sequence", "type": ["null", "string"], "default": None},
                {"name": "schema", "type": "string"},
                {"name": "table", "type": "string"},
                {"name": "txId", "type": ["null", "long"], "default": None},
                {"name": "lsn", "type": ["null", "long"], "default": None},
                {"name": "xmin", "type": ["null", "long"], "default": None}]}},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None},
        {"name": "transaction", "type": ["null", {
            "type": "record", "name": "block", "namespace": "event", "fields": [
                {"name": "id", "type": "string"},
                {"name": "total_order", "type": "long"},
                {"name": "data_collection_order", "type": "long"}]}], "default": None},
    ], "connect.name": "app.public.items.Envelope"}

KEY_SCHEMA = {"type": "record", "name": "Key", "namespace": "app.public.items",
              "fields": [{"name": "id", "type": "long"}],
              "connect.name": "app.public.items.Key"}


def register(url, subject, schema):
    body = json.dumps({"schema": json.dumps(schema)}).encode()
    req = urllib.request.Request(
        f"{url}/subjects/{subject}/versions", data=body, method="POST",
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["id"]


def avro_events(url, topic, millis):
    import fastavro
    schema = json.loads(json.dumps(VALUE_SCHEMA))
    if millis:
        schema["fields"][0]["type"][1]["fields"][3]["type"][1] = TIMESTAMP_MILLIS
    value_id = register(url, f"{topic}-value", schema)
    key_id = register(url, f"{topic}-key", KEY_SCHEMA)
    value_schema = fastavro.parse_schema(schema)
    key_schema = fastavro.parse_schema(KEY_SCHEMA)

    def wire(schema_id, schema, record):
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, schema_id))  # magic byte, schema id
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def row(r):
        if r is None:
            return None
        return {"id": r[0], "name": r[1],
                "price": None if r[2] is None else Decimal(r[2]),
                "updated": None if r[3] is None else r[3] // 1000 if millis else r[3]}

    for lsn, (op, before, after, snap) in enumerate(HISTORY, 1):
        value = {"before": row(before), "after": row(after), "source": source(lsn, snap),
                 "op": op, "ts_ms": 8, "transaction": None}
        key = wire(key_id, key_schema, {"id": (after or before)[0]})
        yield key, wire(value_id, value_schema, value)
        if op == "d":
            yield key, None


# ------------------------------------------------------------------- main ---

def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("json", "avro", "avro-millis") \
            or (sys.argv[1] != "json" and len(sys.argv) < 5):
        sys.exit(__doc__)
    kind, bootstrap, topic = sys.argv[1:4]
    if kind == "json":
        events = json_events()
    else:
        events = avro_events(sys.argv[4], topic, kind == "avro-millis")
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"selfcheck-{topic}",
                  "enable.idempotence": True})
    p.init_transactions(30)
    p.begin_transaction()
    for key, value in events:
        p.produce(topic, key=key, value=value)
    p.commit_transaction(30)
    for r in FINAL:
        updated = {"json": iso_micros(r[3]), "avro": r[3],
                   "avro-millis": iso_micros(r[3], 3)}[kind]
        print(json.dumps({"id": r[0], "name": r[1], "price": r[2], "updated": updated},
                         separators=(",", ":")))
    print('{"rows":%d}' % len(FINAL))


if __name__ == "__main__":
    main()
