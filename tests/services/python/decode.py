#!/usr/bin/env python3
"""decode.py: read every record of some Kafka topics and decode the Avro keys
and values twice, independently of walrelay's Rust code:

  (a) confluent_kafka.schema_registry.avro.AvroDeserializer with a
      SchemaRegistryClient (the way a Python consumer would do it), and
  (b) this script's own reading of the Confluent wire format (magic byte 0,
      4-byte big-endian schema id, Avro binary body), the writer schema
      fetched by id with GET {registry}/schemas/ids/{id}, decoded with
      fastavro.schemaless_reader.

Both results are turned into canonical JSON (see README.md) and must be
equal. Output: one JSON line per record on stdout, in (topic, partition,
offset) order, then {"records": N}. Any problem (not the wire format, the two
decoders disagree, unknown schema id, end of a partition not reached in time)
exits 1 with a message on stderr naming topic/partition/offset.

  decode.py --bootstrap HOST:PORT --registry-url URL
            (--topic T [--topic T2 ...] | --topic-regex R)
            [--timeout-seconds 60] [--idle-seconds 3] [--allow-json]
"""

import argparse
import base64
import datetime
import decimal
import io
import json
import math
import re
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient, prefix_schema_id_deserializer
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class DecodeError(Exception):
    """A problem with one record (or the run): reported, exit status 1."""


def die(msg):
    print("decode.py: " + msg, file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------ schema names ---


def full_name(name, namespace):
    """Avro full name of NAME declared in NAMESPACE."""
    if "." in name or not namespace:
        return name
    return namespace + "." + name


def collect_names(node, namespace, names):
    """Fill NAMES (full name -> (definition, its namespace)) with every named
    type declared in the schema NODE, following Avro's namespace rules."""
    if isinstance(node, list):
        for branch in node:
            collect_names(branch, namespace, names)
    elif isinstance(node, dict):
        kind = node.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            name = full_name(node["name"], node.get("namespace", namespace))
            inner_ns = name.rpartition(".")[0]
            names[name] = (node, inner_ns)
            if kind in ("record", "error"):
                for field in node.get("fields", []):
                    collect_names(field["type"], inner_ns, names)
        elif kind == "array":
            collect_names(node["items"], namespace, names)
        elif kind == "map":
            collect_names(node["values"], namespace, names)
        elif isinstance(kind, (dict, list)):
            collect_names(kind, namespace, names)


class Schema:
    """A writer schema: its JSON, named types and top-level full name."""

    def __init__(self, text):
        self.text = text
        self.json = json.loads(text)
        self.names = {}
        collect_names(self.json, "", self.names)
        top = self.json
        if isinstance(top, dict) and top.get("type") in ("record", "error", "enum", "fixed"):
            self.name = full_name(top["name"], top.get("namespace", ""))
        else:
            self.name = None

    def resolve(self, node, namespace):
        """(definition, namespace) of a type: a name is looked up, a
        {"type": <name or nested type>} wrapper is unwrapped."""
        while True:
            if isinstance(node, str):
                if node in PRIMITIVES:
                    return node, namespace
                for ref in (full_name(node, namespace), node):
                    if ref in self.names:
                        return self.names[ref]
                raise DecodeError("schema names an unknown type %r" % node)
            if isinstance(node, dict):
                kind = node.get("type")
                if kind in ("record", "error", "enum", "fixed"):
                    name = full_name(node["name"], node.get("namespace", namespace))
                    return node, name.rpartition(".")[0]
                if kind in ("array", "map") or kind in PRIMITIVES:
                    return node, namespace
                node = kind
                continue
            return node, namespace


# ---------------------------------------------------------- canonical JSON ---


def decimal_text(d):
    """Exact plain-notation text of a Decimal, keeping its scale."""
    if not d.is_finite():
        raise DecodeError("non-finite decimal %s" % d)
    return format(d, "f")


def variable_scale_decimal(rec):
    """Debezium's VariableScaleDecimal {scale: int, value: bytes} -> text.
    Built from a digit tuple: exact whatever the precision."""
    scale = rec["scale"]
    raw = rec["value"]
    if not isinstance(scale, int) or not isinstance(raw, (bytes, bytearray)):
        raise DecodeError("malformed %s: %r" % (VARIABLE_SCALE_DECIMAL, rec))
    unscaled = int.from_bytes(raw, "big", signed=True)
    digits = tuple(int(c) for c in str(abs(unscaled)))
    return decimal_text(decimal.Decimal((1 if unscaled < 0 else 0, digits, -scale)))


def float_json(x):
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def scalar_json(v):
    """Canonical JSON of a decoded non-container value, by its Python type
    (fastavro has already applied the logical types it knows)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return float_json(v)
    if isinstance(v, decimal.Decimal):
        return decimal_text(v)
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            return v.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")
        return v.isoformat(timespec="microseconds")
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, datetime.time):
        return v.isoformat(timespec="microseconds")
    if isinstance(v, uuid.UUID):
        return str(v)
    raise DecodeError("unexpected decoded value of type %s: %r" % (type(v).__name__, v))


def branch_accepts(schema, node, namespace, v):
    """Could the decoded value V come from the union branch NODE?"""
    node, namespace = schema.resolve(node, namespace)
    kind = node if isinstance(node, str) else node.get("type")
    logical = node.get("logicalType") if isinstance(node, dict) else None
    if kind == "null":
        return v is None
    if kind == "boolean":
        return isinstance(v, bool)
    if isinstance(v, bool) or v is None:
        return False
    if kind in ("int", "long"):
        return isinstance(v, (int, datetime.date, datetime.time))
    if kind in ("float", "double"):
        return isinstance(v, float)
    if kind in ("bytes", "fixed"):
        if logical == "decimal":
            return isinstance(v, (decimal.Decimal, bytes, bytearray))
        return isinstance(v, (bytes, bytearray))
    if kind in ("string", "enum"):
        return isinstance(v, (str, uuid.UUID))
    if kind == "array":
        return isinstance(v, list)
    if kind in ("record", "error", "map"):
        return isinstance(v, dict)
    return False


def to_json(schema, node, v, namespace=""):
    """Canonical JSON of the decoded value V of the schema NODE.
    Decoded with return_record_name=True: a record inside a union comes as
    (full name, dict)."""
    node, namespace = schema.resolve(node, namespace)
    if isinstance(node, list):  # union
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            name, rec = v
            if name not in schema.names:
                raise DecodeError("union branch %r is not a type of the schema" % name)
            return to_json(schema, name, rec, "")
        for branch in node:
            if branch_accepts(schema, branch, namespace, v):
                return to_json(schema, branch, v, namespace)
        raise DecodeError("no union branch of %s fits %r" % (json.dumps(node), v))
    if isinstance(node, str):
        return scalar_json(v)
    kind = node.get("type")
    if kind in ("record", "error"):
        if not isinstance(v, dict):
            raise DecodeError("record %s decoded as %r" % (node.get("name"), v))
        name = full_name(node["name"], node.get("namespace", namespace))
        if name == VARIABLE_SCALE_DECIMAL:
            return variable_scale_decimal(v)
        out = {}
        for field in node["fields"]:
            if field["name"] not in v:
                raise DecodeError("record %s decoded without field %s" % (name, field["name"]))
            out[field["name"]] = to_json(schema, field["type"], v[field["name"]], namespace)
        return out
    if kind == "array":
        return [to_json(schema, node["items"], item, namespace) for item in v]
    if kind == "map":
        return {k: to_json(schema, node["values"], item, namespace) for k, item in v.items()}
    return scalar_json(v)


# ---------------------------------------------------------------- registry ---


class Registry:
    """Path (b): the registry's REST API by hand, schemas cached by id."""

    def __init__(self, url):
        self.url = url.rstrip("/")
        self.cache = {}

    def schema(self, schema_id):
        if schema_id in self.cache:
            return self.cache[schema_id]
        url = "%s/schemas/ids/%d" % (self.url, schema_id)
        req = urllib.request.Request(url, headers={"Accept": "application/vnd.schemaregistry.v1+json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise DecodeError("GET %s: HTTP %d %s" % (url, e.code, e.read().decode("utf-8", "replace")))
        except (urllib.error.URLError, OSError) as e:
            raise DecodeError("GET %s: %s" % (url, e))
        if body.get("schemaType", "AVRO") != "AVRO":
            raise DecodeError("schema id %d is %s, not AVRO" % (schema_id, body["schemaType"]))
        if body.get("references"):
            raise DecodeError("schema id %d has references, not supported: %r" % (schema_id, body["references"]))
        schema = Schema(body["schema"])
        parsed = fastavro.parse_schema(json.loads(body["schema"]))
        self.cache[schema_id] = (schema, parsed)
        return self.cache[schema_id]


# ----------------------------------------------------------------- decoding ---


class Decoder:
    def __init__(self, registry_url, allow_json):
        self.allow_json = allow_json
        self.client = SchemaRegistryClient({"url": registry_url})
        # Subject-independent: no subject name strategy (so no lookup by
        # subject, no rules, no "latest version"), the schema id only from
        # the payload prefix (not from headers).
        conf = {
            "subject.name.strategy": lambda ctx, record_name: None,
            "schema.id.deserializer": prefix_schema_id_deserializer,
        }
        self.confluent = AvroDeserializer(self.client, return_record_name=True, conf=conf)
        self.registry = Registry(registry_url)
        self.client_schemas = {}

    def client_schema(self, schema_id):
        if schema_id not in self.client_schemas:
            self.client_schemas[schema_id] = Schema(self.client.get_schema(schema_id).schema_str)
        return self.client_schemas[schema_id]

    def decode(self, data, topic, field, headers):
        """-> (schema id or None, writer's top-level name or None, canonical
        JSON value). DATA is the key or value bytes (or None)."""
        if data is None:
            return None, None, None
        if len(data) < 5 or data[0] != 0:
            if self.allow_json:
                try:
                    return None, None, {"json": json.loads(data.decode("utf-8"))}
                except (UnicodeDecodeError, ValueError):
                    pass
            raise DecodeError("not in the Confluent wire format (%d bytes, starting %r)" % (len(data), bytes(data[:16])))
        schema_id = struct.unpack(">I", data[1:5])[0]

        # (b) by hand: wire format, REST API, fastavro.
        schema_b, parsed_b = self.registry.schema(schema_id)
        body = io.BytesIO(data[5:])
        try:
            raw_b = fastavro.schemaless_reader(body, parsed_b, None, return_record_name=True)
        except Exception as e:  # fastavro raises many kinds
            raise DecodeError("fastavro failed on schema id %d: %s: %s" % (schema_id, type(e).__name__, e))
        if body.tell() != len(data) - 5:
            raise DecodeError("schema id %d: %d bytes left after the Avro body" % (schema_id, len(data) - 5 - body.tell()))
        json_b = to_json(schema_b, schema_b.json, raw_b)

        # (a) confluent-kafka's AvroDeserializer.
        ctx = SerializationContext(topic, field, headers)
        try:
            raw_a = self.confluent(bytes(data), ctx)
        except Exception as e:
            raise DecodeError("AvroDeserializer failed on schema id %d: %s: %s" % (schema_id, type(e).__name__, e))
        schema_a = self.client_schema(schema_id)
        json_a = to_json(schema_a, schema_a.json, raw_a)

        if schema_a.name != schema_b.name:
            raise DecodeError("schema id %d: writer name %r (SchemaRegistryClient) != %r (REST)" % (schema_id, schema_a.name, schema_b.name))
        text_a = json.dumps(json_a, sort_keys=False, separators=(",", ":"))
        text_b = json.dumps(json_b, sort_keys=False, separators=(",", ":"))
        if text_a != text_b:
            raise DecodeError("the decoders disagree (schema id %d):\n  AvroDeserializer: %s\n  fastavro by hand: %s" % (schema_id, text_a, text_b))
        return schema_id, schema_b.name, json_b


# -------------------------------------------------------------------- kafka ---


def resolve_topics(consumer, topics, regex, timeout):
    md = consumer.list_topics(timeout=timeout)
    if regex is not None:
        pattern = re.compile(regex)
        names = sorted(t for t in md.topics if pattern.fullmatch(t) and not t.startswith("__"))
        if not names:
            die("no topic matches --topic-regex %r (topics: %s)" % (regex, ", ".join(sorted(md.topics)) or "none"))
    else:
        names = list(dict.fromkeys(topics))
    parts = []
    for name in names:
        tmd = md.topics.get(name)
        if tmd is None or tmd.error is not None:
            die("topic %s: %s" % (name, tmd.error if tmd is not None else "not found"))
        for p in sorted(tmd.partitions):
            parts.append((name, p))
    return parts


def read_all(consumer, decoder, parts, deadline, idle_seconds):
    """Every record from offset 0 (the low watermark) up to the end offsets
    seen at start -> list of output dicts, sorted."""
    ends = {}
    assign = []
    for topic, p in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=max(1.0, deadline - time.monotonic()), cached=False)
        if high > low:
            ends[(topic, p)] = high
            assign.append(TopicPartition(topic, p, low))
    out = []
    if not assign:
        return out
    consumer.assign(assign)
    pending = set(ends)
    eof_since = {}  # (topic, p) -> monotonic time of an EOF below the end
    while pending:
        now = time.monotonic()
        if now >= deadline:
            left = ", ".join("%s/%d (end %d, position %s)" % (t, p, ends[(t, p)], position(consumer, t, p)) for t, p in sorted(pending))
            die("timeout before the end offsets of: " + left)
        for key, since in list(eof_since.items()):
            if key in pending and now - since >= idle_seconds:
                print("decode.py: %s/%d: at EOF below the end offset %d for %.1fs, taken as done"
                      % (key[0], key[1], ends[key], now - since), file=sys.stderr)
                pending.discard(key)
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            key = (msg.topic(), msg.partition())
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    if key in pending:
                        at = max(msg.offset(), position(consumer, *key) or 0)
                        if at >= ends[key]:
                            pending.discard(key)
                        else:
                            eof_since.setdefault(key, time.monotonic())
                    continue
                die("consumer error: %s" % msg.error())
            eof_since.pop(key, None)
            end = ends.get(key)
            if end is None or msg.offset() >= end:
                pending.discard(key)
                continue
            out.append(record_json(decoder, msg))
            if msg.offset() + 1 >= end:
                pending.discard(key)
    out.sort(key=lambda r: (r["topic"], r["partition"], r["offset"]))
    return out


def position(consumer, topic, p):
    try:
        (tp,) = consumer.position([TopicPartition(topic, p)])
        return tp.offset if tp.offset >= 0 else None
    except KafkaException:
        return None


def record_json(decoder, msg):
    where = "topic %s partition %d offset %d" % (msg.topic(), msg.partition(), msg.offset())
    headers = msg.headers()
    try:
        key_id, _, key = decoder.decode(msg.key(), msg.topic(), MessageField.KEY, headers)
    except DecodeError as e:
        die("%s: key: %s" % (where, e))
    try:
        value_id, value_name, value = decoder.decode(msg.value(), msg.topic(), MessageField.VALUE, headers)
    except DecodeError as e:
        die("%s: value: %s" % (where, e))
    return {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key_schema_id": key_id,
        "value_schema_id": value_id,
        "value_schema_name": value_name,
        "key": key,
        "value": value,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    ap.add_argument("--registry-url", required=True, help="Confluent-compatible registry base URL")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--topic", action="append", help="a topic (repeatable)")
    group.add_argument("--topic-regex", help="every topic whose whole name matches (internal __ topics excluded)")
    ap.add_argument("--timeout-seconds", type=float, default=60.0, help="overall limit (default 60)")
    ap.add_argument("--idle-seconds", type=float, default=3.0,
                    help="a partition at EOF below its end offset for this long is done (default 3)")
    ap.add_argument("--allow-json", action="store_true", help='non-Avro JSON keys/values become {"json": ...}')
    args = ap.parse_args()

    deadline = time.monotonic() + args.timeout_seconds
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": "walrelay-decode-%s" % uuid.uuid4(),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "client.id": "walrelay-decode.py",
    })
    try:
        decoder = Decoder(args.registry_url, args.allow_json)
        parts = resolve_topics(consumer, args.topic, args.topic_regex, max(1.0, deadline - time.monotonic()))
        records = read_all(consumer, decoder, parts, deadline, args.idle_seconds)
    except KafkaException as e:
        die("kafka: %s" % e)
    finally:
        consumer.close()
    # UTF-8 whatever the locale.
    w = sys.stdout.buffer
    for r in records:
        w.write((json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8"))
    w.write((json.dumps({"records": len(records)}) + "\n").encode("utf-8"))
    w.flush()


if __name__ == "__main__":
    main()
