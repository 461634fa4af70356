#!/usr/bin/env bash
# smoke.sh URL: checks that the node at URL (e.g. the one `opensearch.sh start` printed) answers
# the requests walrelay's indexer makes the way a real OpenSearch 2.x does:
#   - index creation with mappings: _meta, a field alias, long, double, boolean, binary, date
#     (strict_date_optional_time||epoch_millis), keyword, text with a keyword subfield, an object
#     with enabled:false; the node's defaults (1 shard, 0 replicas, green);
#   - PUT _mapping adding a field (and replacing _meta);
#   - _bulk index/delete with external versions: a lower or equal version is a per-item 409
#     version_conflict_engine_exception, a delete leaves a tombstone that still refuses older ones;
#   - GET _doc, PUT _doc?version=N&version_type=external (201, then 409), _refresh, _count;
#   - searches: ?q= through an alias, a match through a field alias, a term on text.keyword, a
#     date range mixing ISO and epoch-millis input;
#   - _delete_by_query with a range query (the reindex module);
#   - POST _aliases add, then remove+add as one atomic swap; GET _alias, GET _alias/NAME;
#   - GET _cat/indices?format=json; DELETE of the indexes.
# It works in indexes of its own (random names, deleted at the end) and leaves the node as it
# found it. Prints one line a check and "N passed, N failed"; exits 1 if anything failed.
# Needs curl and python3.
set -euo pipefail

URL="${1:?usage: smoke.sh URL (e.g. http://127.0.0.1:9200)}"
URL="${URL%/}"
SUFFIX="$$-$RANDOM"
IDX="smoke-$SUFFIX.public.orders"
IDX2="smoke-$SUFFIX.public.orders-v2"
ALIAS="smoke-$SUFFIX.orders"

PASSED=0
FAILED=0
STATUS=000
BODY=""

# req METHOD PATH [BODY [CONTENT-TYPE]]: sets STATUS and BODY.
req() {
  local method="$1" path="$2" data="${3-}" ctype="${4:-application/json}" out
  local -a args=(-sS -m 60 -X "$method" "$URL$path" -w '\n%{http_code}')
  if [[ -n "$data" ]]; then
    args+=(-H "Content-Type: $ctype" --data-binary "$data")
  fi
  if out="$(curl "${args[@]}" 2>&1)"; then
    STATUS="${out##*$'\n'}"
    BODY="${out%$'\n'*}"
  else
    STATUS=000
    BODY="curl failed: $out"
  fi
}

# check DESCRIPTION PYTHON-EXPRESSION: the expression sees s (the HTTP status, an int) and j (the
# parsed JSON body, or None).
check() {
  local desc="$1" expr="$2"
  if STATUS="$STATUS" BODY="$BODY" python3 -c '
import json, os, sys
s = int(os.environ["STATUS"] or 0)
try:
    j = json.loads(os.environ["BODY"])
except ValueError:
    j = None
try:
    ok = eval(sys.argv[1])
except Exception:
    ok = False
sys.exit(0 if ok else 1)
' "$expr"; then
    PASSED=$((PASSED + 1))
    echo "ok   $desc"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL $desc"
    echo "     expected: $expr"
    echo "     got: HTTP $STATUS $(head -c 600 <<<"$BODY")"
  fi
}

cleanup() {
  curl -s -m 30 -o /dev/null -X DELETE "$URL/$IDX,$IDX2?ignore_unavailable=true" || true
}
trap cleanup EXIT

# ----------------------------------------------------------------- the node ---

req GET /
check "GET / is OpenSearch 2.x" 's == 200 and j["version"]["distribution"] == "opensearch" and j["version"]["number"].startswith("2.")'
VERSION_LINE="$(python3 -c 'import json,sys; v=json.load(sys.stdin)["version"]; print(v["number"], "lucene", v["lucene_version"])' <<<"$BODY" 2>/dev/null || echo '?')"

# ------------------------------------------------------------ create, mapping ---

req PUT "/$IDX" '{
  "mappings": {
    "_meta": {"walrelay": {"table": "public.orders", "schema_version": 3}},
    "properties": {
      "id": {"type": "long"},
      "amount": {"type": "double"},
      "paid": {"type": "boolean"},
      "payload": {"type": "binary"},
      "created_at": {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
      "status": {"type": "keyword"},
      "note": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
      "extra": {"type": "object", "enabled": false},
      "customer_name": {"type": "text"},
      "buyer": {"type": "alias", "path": "customer_name"}
    }
  }
}'
check "PUT /idx with mappings is acknowledged" "s == 200 and j['acknowledged'] is True and j['index'] == '$IDX'"

req GET "/$IDX/_mapping"
check "the mapping keeps _meta" "j['$IDX']['mappings']['_meta'] == {'walrelay': {'table': 'public.orders', 'schema_version': 3}}"
check "the field alias is a field alias" "j['$IDX']['mappings']['properties']['buyer'] == {'type': 'alias', 'path': 'customer_name'}"
check "long, double, boolean, binary, keyword are typed" "[j['$IDX']['mappings']['properties'][f]['type'] for f in ('id', 'amount', 'paid', 'payload', 'status')] == ['long', 'double', 'boolean', 'binary', 'keyword']"
# strict_date_optional_time||epoch_millis is the default format, and OpenSearch leaves defaults
# out of GET _mapping: the field reads back as {"type": "date"}.
check "the date reads back as a date (its format is the default, so not echoed)" "j['$IDX']['mappings']['properties']['created_at'] == {'type': 'date'}"
check "text has its keyword subfield" "j['$IDX']['mappings']['properties']['note']['fields']['keyword']['type'] == 'keyword'"
check "the object is disabled" "j['$IDX']['mappings']['properties']['extra'] == {'type': 'object', 'enabled': False}"

req GET "/$IDX/_settings"
check "the node's defaults: 1 shard, 0 replicas" "j['$IDX']['settings']['index']['number_of_shards'] == '1' and j['$IDX']['settings']['index']['number_of_replicas'] == '0'"

req GET "/_cluster/health/$IDX?wait_for_status=green&timeout=30s"
check "the index is green" "s == 200 and j['status'] == 'green'"

req PUT "/$IDX/_mapping" '{
  "_meta": {"walrelay": {"table": "public.orders", "schema_version": 4}},
  "properties": {"region": {"type": "keyword"}}
}'
check "PUT _mapping adding a field is acknowledged" "s == 200 and j['acknowledged'] is True"
req GET "/$IDX/_mapping"
check "the new field is there, the old ones too" "j['$IDX']['mappings']['properties']['region'] == {'type': 'keyword'} and 'buyer' in j['$IDX']['mappings']['properties']"
check "PUT _mapping replaced _meta" "j['$IDX']['mappings']['_meta']['walrelay']['schema_version'] == 4"

req PUT "/$IDX/_mapping" '{"properties": {"id": {"type": "keyword"}}}'
check "changing a field's type is refused (400 illegal_argument_exception)" "s == 400 and j['error']['type'] == 'illegal_argument_exception'"

# -------------------------------------------------------------------- _bulk ---

BULK1="$(cat <<EOF
{"index":{"_index":"$IDX","_id":"1","version":5,"version_type":"external"}}
{"id":1,"amount":12.5,"paid":true,"payload":"aGVsbG8=","created_at":"2024-05-01T10:00:00Z","status":"new","note":"first order of Alice","extra":{"anything":[1,"x",{"y":null}]},"customer_name":"Alice Smith"}
{"index":{"_index":"$IDX","_id":"2","version":5,"version_type":"external"}}
{"id":2,"amount":7,"paid":false,"created_at":1714557600000,"status":"paid","note":"second order","customer_name":"Bob Jones","region":"eu"}
{"index":{"_index":"$IDX","_id":"3","version":1,"version_type":"external"}}
{"id":3,"amount":1.25,"paid":false,"created_at":"2024-05-02","status":"new","note":"third","customer_name":"Carol"}
{"index":{"_index":"$IDX","_id":"4","version":7,"version_type":"external"}}
{"id":4,"amount":99.99,"paid":true,"created_at":"2024-06-01T00:00:00.123+02:00","status":"shipped","note":"fourth","customer_name":"Dave"}
EOF
)"$'\n'
req POST "/_bulk" "$BULK1" application/x-ndjson
check "bulk of 4 external-version index actions: no error" "s == 200 and j['errors'] is False and [i['index']['status'] for i in j['items']] == [201, 201, 201, 201]"
check "each item reports its external version" "[i['index']['_version'] for i in j['items']] == [5, 5, 1, 7]"

BULK2="$(cat <<EOF
{"index":{"_index":"$IDX","_id":"1","version":4,"version_type":"external"}}
{"id":1,"amount":0,"status":"stale"}
{"delete":{"_index":"$IDX","_id":"2","version":3,"version_type":"external"}}
{"index":{"_index":"$IDX","_id":"4","version":7,"version_type":"external"}}
{"id":4,"amount":0,"status":"same version"}
{"delete":{"_index":"$IDX","_id":"3","version":2,"version_type":"external"}}
{"index":{"_index":"$IDX","_id":"1","version":6,"version_type":"external"}}
{"id":1,"amount":13.5,"paid":true,"payload":"aGVsbG8=","created_at":"2024-05-01T10:00:00Z","status":"new","note":"first order of Alice, amended","customer_name":"Alice Smith"}
{"delete":{"_index":"$IDX","_id":"99","version":10,"version_type":"external"}}
EOF
)"$'\n'
req POST "/_bulk" "$BULK2" application/x-ndjson
check "bulk with stale versions: errors is true, one status per item" "s == 200 and j['errors'] is True and [list(i)[0] + ':' + str(list(i.values())[0]['status']) for i in j['items']] == ['index:409', 'delete:409', 'index:409', 'delete:200', 'index:200', 'delete:404']"
check "a lower index version is version_conflict_engine_exception" "j['items'][0]['index']['error']['type'] == 'version_conflict_engine_exception'"
check "a lower delete version is version_conflict_engine_exception" "j['items'][1]['delete']['error']['type'] == 'version_conflict_engine_exception'"
check "an equal version is version_conflict_engine_exception" "j['items'][2]['index']['error']['type'] == 'version_conflict_engine_exception'"
check "a newer delete deletes, a newer index updates" "j['items'][3]['delete']['result'] == 'deleted' and j['items'][4]['index']['result'] == 'updated' and j['items'][4]['index']['_version'] == 6"
check "a delete of a missing document is not_found (no error)" "j['items'][5]['delete']['result'] == 'not_found' and 'error' not in j['items'][5]['delete']"

BULK3="$(cat <<EOF
{"index":{"_index":"$IDX","_id":"3","version":1,"version_type":"external"}}
{"id":3,"status":"resurrected"}
EOF
)"$'\n'
req POST "/_bulk" "$BULK3" application/x-ndjson
check "the delete's tombstone refuses an older version (409)" "j['items'][0]['index']['status'] == 409 and j['items'][0]['index']['error']['type'] == 'version_conflict_engine_exception'"

# -------------------------------------------------------------------- _doc ---

req GET "/$IDX/_doc/1"
check "GET _doc: found, external version, source as sent" "s == 200 and j['found'] is True and j['_version'] == 6 and j['_source']['amount'] == 13.5 and j['_source']['payload'] == 'aGVsbG8='"
req GET "/$IDX/_doc/3"
check "GET _doc of a deleted document is 404, found false" "s == 404 and j['found'] is False"

req PUT "/$IDX/_doc/5?version=10&version_type=external" '{"id":5,"amount":3.5,"paid":false,"created_at":"2024-07-01T12:00:00Z","status":"new","note":"fifth","customer_name":"Eve"}'
check "PUT _doc?version=10&version_type=external creates (201)" "s == 201 and j['result'] == 'created' and j['_version'] == 10"
req PUT "/$IDX/_doc/5?version=9&version_type=external" '{"id":5,"status":"stale"}'
check "PUT _doc with a lower external version: 409 version_conflict_engine_exception" "s == 409 and j['error']['type'] == 'version_conflict_engine_exception' and j['status'] == 409"
req PUT "/$IDX/_doc/5?version=10&version_type=external" '{"id":5,"status":"same"}'
check "PUT _doc with the same external version: 409" "s == 409 and j['error']['type'] == 'version_conflict_engine_exception'"
req PUT "/$IDX/_doc/5?version=11&version_type=external" '{"id":5,"amount":4.5,"paid":true,"created_at":"2024-07-01T12:00:00Z","status":"paid","note":"fifth","customer_name":"Eve"}'
check "PUT _doc with a newer external version updates (200)" "s == 200 and j['result'] == 'updated' and j['_version'] == 11"

req POST "/$IDX/_refresh"
check "POST _refresh" "s == 200 and j['_shards']['failed'] == 0"

req GET "/$IDX/_count"
check "GET _count: 4 documents (1, 2, 4, 5)" "s == 200 and j['count'] == 4"

# ------------------------------------------------------------------ searches ---

req POST "/$IDX/_search" '{"query": {"match": {"buyer": "alice"}}}'
check "a match through the field alias finds Alice" "s == 200 and j['hits']['total']['value'] == 1 and j['hits']['hits'][0]['_id'] == '1'"
req POST "/$IDX/_search" '{"query": {"term": {"note.keyword": "second order"}}}'
check "a term on the text field's keyword subfield" "s == 200 and [h['_id'] for h in j['hits']['hits']] == ['2']"
req POST "/$IDX/_search" '{"query": {"range": {"created_at": {"gte": "2024-05-01T10:00:00Z", "lt": 1717200000000}}}, "sort": [{"id": "asc"}]}'
check "a date range mixing ISO and epoch millis (documents indexed either way)" "s == 200 and [h['_id'] for h in j['hits']['hits']] == ['1', '2', '4']"

# ------------------------------------------------------------------- aliases ---

req PUT "/$IDX2" '{"mappings": {"properties": {"status": {"type": "keyword"}}}}'
check "PUT a second index" "s == 200 and j['acknowledged'] is True"

req POST "/_aliases" "{\"actions\": [{\"add\": {\"index\": \"$IDX\", \"alias\": \"$ALIAS\"}}]}"
check "POST _aliases add" "s == 200 and j['acknowledged'] is True"
req GET "/_alias/$ALIAS"
check "GET _alias/NAME names the index" "s == 200 and j == {'$IDX': {'aliases': {'$ALIAS': {}}}}"
req GET "/_alias"
check "GET _alias lists every index, ours with the alias" "s == 200 and j['$IDX']['aliases'] == {'$ALIAS': {}} and j['$IDX2']['aliases'] == {}"

req GET "/$ALIAS/_search?q=status:new"
check "GET ALIAS/_search?q=status:new returns hits (1 and 3 was deleted)" "s == 200 and sorted(h['_id'] for h in j['hits']['hits']) == ['1'] and j['hits']['hits'][0]['_index'] == '$IDX'"
req GET "/$ALIAS/_search?q=alice"
check "GET ALIAS/_search?q=alice (all fields) returns hits" "s == 200 and j['hits']['total']['value'] >= 1"

req POST "/_aliases" "{\"actions\": [{\"remove\": {\"index\": \"$IDX\", \"alias\": \"$ALIAS\"}}, {\"add\": {\"index\": \"$IDX2\", \"alias\": \"$ALIAS\"}}]}"
check "POST _aliases remove + add in one request" "s == 200 and j['acknowledged'] is True"
req GET "/_alias/$ALIAS"
check "the alias moved to the second index only" "s == 200 and j == {'$IDX2': {'aliases': {'$ALIAS': {}}}}"
req POST "/_aliases" "{\"actions\": [{\"remove\": {\"index\": \"$IDX2\", \"alias\": \"$ALIAS\"}}, {\"add\": {\"index\": \"smoke-$SUFFIX-missing\", \"alias\": \"$ALIAS\"}}]}"
check "a swap with a missing index fails (404 index_not_found_exception)" "s == 404 and j['error']['type'] == 'index_not_found_exception'"
req GET "/_alias/$ALIAS"
check "and changed nothing (atomic)" "s == 200 and j == {'$IDX2': {'aliases': {'$ALIAS': {}}}}"
req GET "/_alias/smoke-$SUFFIX-nothing"
check "GET _alias/NAME of an unknown alias is 404" "s == 404"

# ---------------------------------------------------------- _delete_by_query ---

req POST "/$IDX/_delete_by_query?refresh=true" '{"query": {"range": {"id": {"gte": 4}}}}'
check "_delete_by_query with a range deletes 4 and 5" "s == 200 and j['deleted'] == 2 and j['failures'] == []"
req GET "/$IDX/_count"
check "GET _count after it: 2" "s == 200 and j['count'] == 2"

# ------------------------------------------------------------ _cat, DELETE ---

req GET "/_cat/indices?format=json"
check "_cat/indices?format=json lists the index, green, 2 documents" "s == 200 and [(i['health'], i['docs.count'], i['pri'], i['rep']) for i in j if i['index'] == '$IDX'] == [('green', '2', '1', '0')]"

req DELETE "/$IDX"
check "DELETE /idx" "s == 200 and j['acknowledged'] is True"
req GET "/$IDX/_count"
check "the index is gone (404 index_not_found_exception)" "s == 404 and j['error']['type'] == 'index_not_found_exception'"
req DELETE "/$IDX2"
check "DELETE the second index" "s == 200 and j['acknowledged'] is True"

echo "smoke against $URL (OpenSearch $VERSION_LINE):"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
