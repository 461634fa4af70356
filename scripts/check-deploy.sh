#!/usr/bin/env bash
# Checks deploy/ and compose.yaml as far as this machine allows (no Docker engine, no cluster):
#  - Prometheus scrape configs and alert rules with promtool (from Debian's prometheus package,
#    unpacked without installing it by tests/services/prometheus/prometheus.sh, which the tests'
#    real Prometheus also comes from);
#  - Kubernetes manifests against the Kubernetes OpenAPI schemas, offline, strictly
#    (kubernetes-validate from PyPI; CRD examples in deploy/k8s/examples are only parsed);
#  - compose.yaml parses, every built image's context and Dockerfile (and build target) exist,
#    every bind-mounted file exists, Grafana dashboards and provisioning parse.
# The dashboards' and rules' metric names are checked against live /metrics by the consumer's
# integration test `deploy::dashboards_and_alert_rules_use_only_exposed_metrics`; the producer
# dashboard's queries and the Kafka alert are evaluated by a real Prometheus in the producer's
# `observability::dashboard_panels_have_data_and_kafka_alert_fires_when_the_broker_stops`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The one unpacked copy of Debian's prometheus package that the tests' server comes from too.
promtool="$(bash tests/services/prometheus/prometheus.sh install)/promtool"
"$promtool" check config deploy/prometheus/prometheus.yml
"$promtool" check config deploy/prometheus/prometheus-kubernetes.yml
"$promtool" check rules deploy/prometheus/rules/walrelay.yml
# Alert rules' unit tests; every alert must have a case that fires it.
"$promtool" test rules deploy/prometheus/tests/walrelay.yml
python3 - <<'PY'
import sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/rules/walrelay.yml"))
tests = yaml.safe_load(open("deploy/prometheus/tests/walrelay.yml"))
alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
fired = {
    c["alertname"]
    for t in tests["tests"]
    for c in t.get("alert_rule_test", [])
    if c.get("exp_alerts")
}
missing = sorted(alerts - fired)
if missing:
    sys.exit(f"alert rules without a unit test that fires them: {missing} (deploy/prometheus/tests/walrelay.yml)")
print(f"alert rules: all {len(alerts)} fired by their unit tests")
PY

if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  pip=(python3 -m pip install -q --disable-pip-version-check kubernetes-validate==1.37.0 pyyaml)
  # A system Python (PEP 668) refuses plain installs.
  "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages
fi
python3 -m kubernetes_validate --strict --quiet -k 1.30.0 deploy/k8s/*.yaml
echo "deploy/k8s: every manifest is valid against the Kubernetes 1.30 schemas"

python3 - <<'PY'
import json, os, sys, yaml

def fail(msg):
    print(f"compose/deploy check failed: {msg}", file=sys.stderr)
    sys.exit(1)

with open("compose.yaml") as f:
    compose = yaml.safe_load(f)
services = compose.get("services") or fail("compose.yaml has no services")
built = 0
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        fail(f"service {name} has neither image nor build")
    build = svc.get("build")
    if build:
        built += 1
        ctx = build if isinstance(build, str) else build.get("context", ".")
        if not os.path.isdir(ctx):
            fail(f"service {name}: build context {ctx} does not exist")
        dockerfile = os.path.join(ctx, (build.get("dockerfile") if isinstance(build, dict) else None) or "Dockerfile")
        if not os.path.isfile(dockerfile):
            fail(f"service {name}: {dockerfile} does not exist")
        target = build.get("target") if isinstance(build, dict) else None
        if target:
            stages = [l.split()[-1] for l in open(dockerfile) if l.upper().startswith("FROM ") and " AS " in l.upper()]
            if target not in stages:
                fail(f"service {name}: target {target} is not a stage of {dockerfile} ({stages})")
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith("./") and not os.path.exists(src):
            fail(f"service {name}: mounted {src} does not exist")
    for dep in (svc.get("depends_on") or {}):
        if dep not in services:
            fail(f"service {name} depends on unknown service {dep}")
if built < 3:
    fail("expected the producer and consumer images to be built")
for d in ["deploy/grafana/dashboards"]:
    for f in os.listdir(d):
        dash = json.load(open(os.path.join(d, f)))
        panels = dash.get("panels") or fail(f"{f}: no panels")
        for p in panels:
            if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
                fail(f"{f}: panel {p.get('title')} has no query")
for root, _, fs in os.walk("deploy/grafana/provisioning"):
    for f in fs:
        yaml.safe_load(open(os.path.join(root, f)))
# compose.yaml runs the server versions the test suite runs against (tests/services/*/pom.xml).
import re
for svc, pom, prop in [("kafka", "tests/services/kafka/pom.xml", "kafka.version"),
                       ("opensearch", "tests/services/opensearch/pom.xml", "opensearch.version")]:
    tested = re.search(rf"<{re.escape(prop)}>([^<]+)</", open(pom).read()).group(1)
    image = services[svc]["image"]
    if image.rsplit(":", 1)[-1] != tested:
        fail(f"compose.yaml runs {image} but the suite tests {svc} {tested} ({pom}); use the same version")
print(f"compose.yaml: {len(services)} services, {built} built from existing Dockerfiles; dashboards parse")
PY
