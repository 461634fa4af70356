#!/usr/bin/env python3
"""selfcheck.py: produce Debezium-shaped Avro records with confluent-kafka's
AvroSerializer into a real Kafka and a real registry, run decode.py on them
and compare its output with the canonical JSON written out by hand below.
selfcheck.sh starts and stops the servers; this script only needs their
addresses:

  selfcheck.py --bootstrap HOST:PORT --registry-url URL

Exit 0 when every check passed, 1 otherwise (differences on stderr).
"""

import argparse
import datetime
import decimal
import json
import os
import subprocess
import sys
import urllib.request
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    topic_record_subject_name_strategy,
    topic_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

HERE = os.path.dirname(os.path.abspath(__file__))
DECODE = os.path.join(HERE, "decode.py")
UTC = datetime.timezone.utc

FAILURES = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, file=sys.stderr)
    if not cond:
        FAILURES.append(what)


# ------------------------------------------------------------------ schemas ---

DECIMAL_10_2 = {
    "type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2,
    "connect.name": "org.apache.kafka.connect.data.Decimal",
    "connect.parameters": {"scale": "2", "connect.decimal.precision": "10"},
}

SOURCE = {
    "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
    "fields": [
        {"name": "version", "type": "string"},
        {"name": "connector", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {"name": "snapshot", "type": [{"type": "string", "connect.name": "io.debezium.data.Enum"}, "null"], "default": "false"},
        {"name": "db", "type": "string"},
        {"name": "sequence", "type": ["null", "string"], "default": None},
        {"name": "schema", "type": "string"},
        {"name": "table", "type": "string"},
        {"name": "txId", "type": ["null", "long"], "default": None},
        {"name": "lsn", "type": ["null", "long"], "default": None},
        {"name": "xmin", "type": ["null", "long"], "default": None},
    ],
}


def envelope(namespace, value_fields, value_props=None):
    value = {"type": "record", "name": "Value", "fields": value_fields,
             "connect.name": namespace + ".Value"}
    value.update(value_props or {})
    return {
        "type": "record", "name": "Envelope", "namespace": namespace,
        "fields": [
            {"name": "before", "type": ["null", value], "default": None},
            {"name": "after", "type": ["null", "Value"], "default": None},
            {"name": "source", "type": SOURCE},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": None},
        ],
        "connect.name": namespace + ".Envelope",
    }


def key_schema(namespace):
    return {"type": "record", "name": "Key", "namespace": namespace,
            "fields": [{"name": "id", "type": "long"}], "connect.name": namespace + ".Key"}


ITEMS_FIELDS_V1 = [
    {"name": "id", "type": "long", "walrelay.type": "int8"},
    {"name": "price", "type": ["null", DECIMAL_10_2], "default": None, "walrelay.type": "numeric(10,2)"},
]
# v2 of the same subject: one more nullable column (BACKWARD compatible).
ITEMS_FIELDS_V2 = ITEMS_FIELDS_V1 + [{"name": "note", "type": ["null", "string"], "default": None}]
ITEMS_PROPS = {"walrelay.table": "public.items"}

VSD = {
    "type": "record", "name": "VariableScaleDecimal", "namespace": "io.debezium.data",
    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
    "connect.name": "io.debezium.data.VariableScaleDecimal",
}

WIDE_FIELDS = [
    {"name": "id", "type": "long"},
    {"name": "dec", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3,
                                      "connect.name": "org.apache.kafka.connect.data.Decimal",
                                      "connect.parameters": {"scale": "3", "connect.decimal.precision": "12"}}],
     "default": None},
    {"name": "num", "type": ["null", VSD], "default": None},
    {"name": "num2", "type": ["null", "io.debezium.data.VariableScaleDecimal"], "default": None},
    {"name": "ts", "type": ["null", {"type": "long", "logicalType": "timestamp-micros",
                                     "connect.name": "io.debezium.time.MicroTimestamp"}], "default": None},
    {"name": "tsm", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "lts", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
    {"name": "d", "type": ["null", {"type": "int", "logicalType": "date", "connect.name": "io.debezium.time.Date"}],
     "default": None},
    {"name": "t", "type": {"type": "long", "logicalType": "time-micros"}},
    {"name": "tm", "type": {"type": "int", "logicalType": "time-millis"}},
    {"name": "u", "type": ["null", {"type": "string", "logicalType": "uuid", "connect.name": "io.debezium.data.Uuid"}],
     "default": None},
    {"name": "b", "type": ["null", "bytes"], "default": None},
    {"name": "arr", "type": ["null", {"type": "array", "items": ["null", "long"]}], "default": None},
    {"name": "js", "type": ["null", {"type": "string", "connect.name": "io.debezium.data.Json"}], "default": None},
    {"name": "m", "type": {"type": "map", "values": "string"}},
    {"name": "f", "type": "double"},
    {"name": "flag", "type": "boolean"},
    {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]}},
    {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
]


def source(table, ts_ms, lsn):
    return {"version": "0.1.0", "connector": "postgresql", "name": "app", "ts_ms": ts_ms,
            "snapshot": "false", "db": "db", "sequence": None, "schema": "public", "table": table,
            "txId": 700, "lsn": lsn, "xmin": None}


def source_json(table, ts_ms, lsn):
    return source(table, ts_ms, lsn)  # plain strings and numbers: the same


def vsd(unscaled, scale):
    n = max(1, (unscaled.bit_length() + 8) // 8)
    return {"scale": scale, "value": unscaled.to_bytes(n, "big", signed=True)}


# ----------------------------------------------------------------- produce ---


class Sink:
    """A producer that remembers where each record went."""

    def __init__(self, bootstrap, **conf):
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                  "linger.ms": 5, **conf})
        self.delivered = []

    def send(self, topic, partition, key, value, expected):
        def done(err, msg):
            if err is not None:
                raise RuntimeError("delivery failed: %s" % err)
            self.delivered.append(((msg.topic(), msg.partition(), msg.offset()), expected))

        kwargs = {"partition": partition} if partition is not None else {}
        self.producer.produce(topic, key=key, value=value, on_delivery=done, **kwargs)
        self.producer.poll(0)

    def flush(self):
        left = self.producer.flush(30)
        if left:
            raise RuntimeError("%d records not delivered" % left)


def run_decode(args, expect_ok=True):
    proc = subprocess.run([sys.executable, DECODE] + args, capture_output=True, text=True, timeout=180)
    if expect_ok and proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
    return proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--registry-url", required=True)
    a = ap.parse_args()
    url = a.registry_url.rstrip("/")

    admin = AdminClient({"bootstrap.servers": a.bootstrap})
    topics = {"app.public.items": 2, "app.public.wide": 1, "app.json": 1, "app.bad": 1, "app.open": 1}
    for t, f in admin.create_topics([NewTopic(t, n, 1) for t, n in topics.items()]).items():
        f.result(30)

    sr = SchemaRegistryClient({"url": url})
    ctx_key = lambda t: SerializationContext(t, MessageField.KEY)  # noqa: E731
    ctx_val = lambda t: SerializationContext(t, MessageField.VALUE)  # noqa: E731
    topic_conf = {"subject.name.strategy": topic_subject_name_strategy}
    record_conf = {"subject.name.strategy": topic_record_subject_name_strategy}

    # --- app.public.items: TopicNameStrategy, two value schema versions, a
    # tombstone, idempotent (non-transactional) producer, 2 partitions.
    T = "app.public.items"
    ns = "app.public.items"
    key_ser = AvroSerializer(sr, json.dumps(key_schema(ns)), conf=topic_conf)
    v1 = AvroSerializer(sr, json.dumps(envelope(ns, ITEMS_FIELDS_V1, ITEMS_PROPS)), conf=topic_conf)
    v2 = AvroSerializer(sr, json.dumps(envelope(ns, ITEMS_FIELDS_V2, ITEMS_PROPS)), conf=topic_conf)
    sink = Sink(a.bootstrap)

    def item(id_, price):
        return {"id": id_, "price": price}

    def items_row(before, after, op, lsn):
        return {"before": before, "after": after, "source": source("items", 1700000000000 + lsn, lsn),
                "op": op, "ts_ms": 1700000000100 + lsn}

    def items_json(before, after, op, lsn):
        return {"before": before, "after": after, "source": source_json("items", 1700000000000 + lsn, lsn),
                "op": op, "ts_ms": 1700000000100 + lsn}

    D = decimal.Decimal
    produced_items = [
        # (partition, key id, serializer, value or None, expected value JSON, version)
        (0, 1, v1, items_row(None, item(1, D("12.34")), "c", 10),
         items_json(None, {"id": 1, "price": "12.34"}, "c", 10), 1),
        (0, 1, v1, items_row(item(1, D("12.34")), item(1, None), "u", 11),
         items_json({"id": 1, "price": "12.34"}, {"id": 1, "price": None}, "u", 11), 1),
        (1, 2, v1, items_row(None, item(2, D("-0.50")), "r", 12),
         items_json(None, {"id": 2, "price": "-0.50"}, "r", 12), 1),
        (0, 1, v1, items_row(item(1, None), None, "d", 13),
         items_json({"id": 1, "price": None}, None, "d", 13), 1),
        (0, 1, None, None, None, None),  # tombstone
        (1, 3, v2, items_row(None, {"id": 3, "price": D("99999999.99"), "note": "ünïcode ✓"}, "c", 14),
         items_json(None, {"id": 3, "price": "99999999.99", "note": "ünïcode ✓"}, "c", 14), 2),
        (1, 2, v2, items_row({"id": 2, "price": D("-0.50"), "note": None}, {"id": 2, "price": D("0.00"), "note": None}, "u", 15),
         items_json({"id": 2, "price": "-0.50", "note": None}, {"id": 2, "price": "0.00", "note": None}, "u", 15), 2),
    ]
    for part, kid, ser, value, expected, version in produced_items:
        k = key_ser({"id": kid}, ctx_key(T))
        v = ser(value, ctx_val(T)) if ser is not None else None
        sink.send(T, part, k, v, {"key": {"id": kid}, "value": expected, "version": version,
                                  "value_schema_name": None if value is None else ns + ".Envelope"})
    sink.flush()

    # --- app.public.wide: TopicRecordNameStrategy, every logical type,
    # transactional producer with one aborted transaction in between.
    W = "app.public.wide"
    wns = "app.public.wide"
    wkey = AvroSerializer(sr, json.dumps(key_schema(wns)), conf=record_conf)
    wval = AvroSerializer(sr, json.dumps(envelope(wns, WIDE_FIELDS)), conf=record_conf)
    tx = Sink(a.bootstrap, **{"transactional.id": "selfcheck-%s" % uuid.uuid4()})
    tx.producer.init_transactions(30)

    u1 = uuid.UUID("123e4567-e89b-12d3-a456-426614174000")
    wide1 = {
        "id": 1,
        "dec": D("12.340"),
        "num": vsd(-123456789012345678901234567890123456789, 5),
        "num2": vsd(0, 0),
        "ts": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "tsm": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        "lts": datetime.datetime(1999, 12, 31, 23, 59, 59, 1),
        "d": datetime.date(2024, 2, 29),
        "t": datetime.time(3, 4, 5, 123456),
        "tm": datetime.time(23, 59, 59, 999000),
        "u": u1,
        "b": b"\x00\xff\x10binary",
        "arr": [1, None, -3],
        "js": '{"a": [1, 2.5, null]}',
        "m": {"x": "1", "y": "two"},
        "f": 1.5,
        "flag": True,
        "color": "GREEN",
        "fx": b"\x01\x02\x03\x04",
    }
    wide1_json = {
        "id": 1,
        "dec": "12.340",
        "num": "-1234567890123456789012345678901234.56789",
        "num2": "0",
        "ts": "2024-01-02T03:04:05.123456+00:00",
        "tsm": "2024-01-02T03:04:05.123000+00:00",
        "lts": "1999-12-31T23:59:59.000001",
        "d": "2024-02-29",
        "t": "03:04:05.123456",
        "tm": "23:59:59.999000",
        "u": "123e4567-e89b-12d3-a456-426614174000",
        "b": "AP8QYmluYXJ5",
        "arr": [1, None, -3],
        "js": '{"a": [1, 2.5, null]}',
        "m": {"x": "1", "y": "two"},
        "f": 1.5,
        "flag": True,
        "color": "GREEN",
        "fx": "AQIDBA==",
    }
    wide2 = {k: None for k in ("dec", "num", "num2", "ts", "d", "u", "b", "arr", "js")}
    wide2.update({
        "id": 2,
        "tsm": datetime.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        "lts": datetime.datetime(1970, 1, 1),
        "t": datetime.time(0, 0),
        "tm": datetime.time(0, 0),
        "m": {},
        "f": -0.25,
        "flag": False,
        "color": "RED",
        "fx": b"\x00\x00\x00\x00",
        "arr": [],
        "num": vsd(5, 3),
        "dec": D("-0.001"),
    })
    wide2_json = {k: None for k in ("dec", "num", "num2", "ts", "d", "u", "b", "arr", "js")}
    wide2_json.update({
        "id": 2,
        "tsm": "1969-12-31T23:59:59.999000+00:00",
        "lts": "1970-01-01T00:00:00.000000",
        "t": "00:00:00.000000",
        "tm": "00:00:00.000000",
        "m": {},
        "f": -0.25,
        "flag": False,
        "color": "RED",
        "fx": "AAAAAA==",
        "arr": [],
        "num": "0.005",
        "dec": "-0.001",
    })
    wide_order = list(wide1_json)  # canonical output keeps the schema's field order
    wide2_json = {k: wide2_json[k] for k in wide_order}

    def wide_row(before, after, op, lsn):
        return {"before": before, "after": after, "source": source("wide", 1700000001000, lsn), "op": op, "ts_ms": None}

    def wide_json(before, after, op, lsn):
        return {"before": before, "after": after, "source": source_json("wide", 1700000001000, lsn), "op": op, "ts_ms": None}

    def wide_send(sink, kid, row, expected):
        sink.send(W, 0, wkey({"id": kid}, ctx_key(W)), wval(row, ctx_val(W)) if row is not None else None,
                  {"key": {"id": kid}, "value": expected,
                   "value_schema_name": None if row is None else wns + ".Envelope"})

    tx.producer.begin_transaction()
    wide_send(tx, 1, wide_row(None, wide1, "c", 20), wide_json(None, wide1_json, "c", 20))
    wide_send(tx, 2, wide_row(None, wide2, "c", 21), wide_json(None, wide2_json, "c", 21))
    tx.flush()
    tx.producer.commit_transaction(30)
    tx.producer.begin_transaction()
    wide_send(tx, 9, wide_row(None, wide2, "c", 22), "ABORTED")
    tx.flush()
    tx.producer.abort_transaction(30)
    tx.producer.begin_transaction()
    wide_send(tx, 2, wide_row(wide2, wide1 | {"id": 2}, "u", 23),
              wide_json(wide2_json, wide1_json | {"id": 2}, "u", 23))
    wide_send(tx, 2, None, None)  # tombstone, last record before the commit marker
    tx.flush()
    tx.producer.commit_transaction(30)
    committed = [d for d in tx.delivered if d[1]["value"] != "ABORTED"]
    check(len(committed) == len(tx.delivered) - 1, "one record produced in an aborted transaction")

    # --- app.json: a plain JSON value; app.bad: wire format, unknown schema id.
    plain = Sink(a.bootstrap)
    plain.send("app.json", 0, None, b'{"id": 1, "v": [true, "x"]}', {"json": {"id": 1, "v": [True, "x"]}})
    plain.send("app.bad", 0, None, b"\x00\x00\x00\x27\x0f\x02", None)
    plain.flush()

    # ---------------------------------------------------------- decode.py ---
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url,
                       "--topic-regex", r"app\.public\..*", "--timeout-seconds", "60"])
    check(proc.returncode == 0, "decode.py --topic-regex app\\.public\\..* exits 0")
    check("taken as done" not in proc.stderr, "every partition ended at its end offset, none by the idle rule")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    check(bool(lines) and lines[-1] == {"records": len(lines) - 1}, "last line is {\"records\": N}")
    got = lines[:-1]

    expected = {}
    for where, e in sink.delivered + committed:
        expected[where] = e
    check(len(got) == len(expected), "%d records decoded, %d expected" % (len(got), len(expected)))
    check([(r["topic"], r["partition"], r["offset"]) for r in got] == sorted(expected),
          "records in (topic, partition, offset) order, aborted ones left out")

    ids = {}
    for r in got:
        where = (r["topic"], r["partition"], r["offset"])
        e = expected.get(where)
        if e is None:
            check(False, "unexpected record %s: %s" % (where, r))
            continue
        check(r["key"] == e["key"], "%s key %s" % (where, json.dumps(r["key"])))
        check(r["value"] == e["value"], "%s value" % (where,))
        if r["value"] != e["value"]:
            print("  got      %s\n  expected %s" % (json.dumps(r["value"]), json.dumps(e["value"])), file=sys.stderr)
        check(r["value_schema_name"] == e["value_schema_name"], "%s value_schema_name %s" % (where, r["value_schema_name"]))
        check(isinstance(r["key_schema_id"], int), "%s key_schema_id %s" % (where, r["key_schema_id"]))
        check((r["value_schema_id"] is None) == (r["value"] is None), "%s value_schema_id %s" % (where, r["value_schema_id"]))
        if "version" in e and e["version"]:
            ids.setdefault(e["version"], set()).add(r["value_schema_id"])
        # Field order as in the schema, also inside nested records.
        if r["topic"] == W and r["value"] and r["value"]["after"]:
            check(list(r["value"]["after"]) == wide_order, "%s field order kept" % (where,))
    check(len(ids.get(1, ())) == 1 and len(ids.get(2, ())) == 1 and ids[1] != ids[2],
          "two value schema versions of %s-value -> two ids %s" % (T, ids))

    # Subjects as the strategies name them; the decoder did not need them.
    subjects = set(sr.get_subjects())
    for s in (T + "-key", T + "-value", W + "-" + wns + ".Key", W + "-" + wns + ".Envelope"):
        check(s in subjects, "subject %s registered" % s)
    check(sr.get_versions(T + "-value") == [1, 2], "%s-value has versions [1, 2]" % T)

    # Custom properties survive registration: GET /schemas/ids/{id}.
    vid = min(ids.get(1, {0}))
    with urllib.request.urlopen("%s/schemas/ids/%d" % (url, vid), timeout=10) as resp:
        back = json.loads(json.loads(resp.read())["schema"])
    value_rec = back["fields"][0]["type"][1]
    check(value_rec.get("walrelay.table") == "public.items", "record property walrelay.table survives")
    check(value_rec["fields"][1].get("walrelay.type") == "numeric(10,2)", "field property walrelay.type survives")
    check(value_rec["fields"][1]["type"][1].get("connect.parameters") == DECIMAL_10_2["connect.parameters"],
          "type property connect.parameters survives")
    check(back.get("connect.name") == ns + ".Envelope", "record property connect.name survives")

    # --topic (repeated) gives the same lines for those topics.
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url, "--topic", W, "--topic", T])
    check(proc.returncode == 0 and [json.loads(x) for x in proc.stdout.splitlines()] == lines,
          "--topic W --topic T: same output as the regex")

    # JSON values: an error unless --allow-json.
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url, "--topic", "app.json"], expect_ok=False)
    check(proc.returncode == 1 and "topic app.json partition 0 offset 0" in proc.stderr
          and "wire format" in proc.stderr, "JSON value without --allow-json: exit 1 naming it")
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url, "--topic", "app.json", "--allow-json"])
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    check(proc.returncode == 0 and out == [
        {"topic": "app.json", "partition": 0, "offset": 0, "key_schema_id": None, "value_schema_id": None,
         "value_schema_name": None, "key": None, "value": {"json": {"id": 1, "v": [True, "x"]}}},
        {"records": 1}], "JSON value with --allow-json: {\"json\": ...}")

    # Wire format with an unknown schema id: an error naming the record.
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url, "--topic", "app.bad"], expect_ok=False)
    check(proc.returncode == 1 and "topic app.bad partition 0 offset 0" in proc.stderr and "9999" in proc.stderr,
          "unknown schema id 9999: exit 1 naming it")
    # A topic that does not exist.
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url, "--topic", "nope",
                       "--timeout-seconds", "10"], expect_ok=False)
    check(proc.returncode == 1, "unknown topic: exit 1")

    # A transaction still open at start: its records are past the last
    # stable offset, decode.py stops before them and exits 0.
    op = Sink(a.bootstrap, **{"transactional.id": "selfcheck-open-%s" % uuid.uuid4()})
    op.producer.init_transactions(30)
    op.producer.begin_transaction()
    op.send("app.open", 0, key_ser({"id": 1}, ctx_key("app.open")), None, None)
    op.flush()
    op.producer.commit_transaction(30)
    op.producer.begin_transaction()
    op.send("app.open", 0, key_ser({"id": 2}, ctx_key("app.open")), None, None)
    op.flush()
    proc = run_decode(["--bootstrap", a.bootstrap, "--registry-url", url, "--topic", "app.open"])
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    check(proc.returncode == 0 and [r.get("key") for r in out] == [{"id": 1}, None] and out[-1] == {"records": 1},
          "open transaction: only the committed record")
    print("     (decode.py stderr with an open transaction: %r)" % proc.stderr.strip(), file=sys.stderr)
    op.producer.abort_transaction(30)

    if FAILURES:
        print("selfcheck: %d check(s) failed" % len(FAILURES), file=sys.stderr)
        sys.exit(1)
    print("selfcheck: all checks passed", file=sys.stderr)


if __name__ == "__main__":
    main()
