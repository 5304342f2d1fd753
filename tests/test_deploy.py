"""deploy/: the compose stack, Prometheus, Grafana and Kubernetes manifests.

promtool checks the Prometheus config and alert rules and runs their unit
tests (deploy/prometheus/alerts_test.yml). A real Prometheus server then runs
deploy/prometheus/prometheus.yml, only the target (and the intervals) swapped,
against the real service: it must scrape it, read the values /query reports,
load and evaluate every alert rule cleanly, and answer every query of the
Grafana dashboard. The compose file and the Kubernetes manifests are checked
for what makes them work together: paths that exist, ports, names, and a
/dev/shm that holds the ring the service's own config loader computes.

The YAML is read with PyYAML and linted with yamllint.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from servicectl import BASE_CONFIG, ROOT, Service, free_port, http_get, plugin_source

import ringcore
from service.settings import load as load_config
from service.workers import plan_workers

DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ringstream.json"
K8S = DEPLOY / "k8s"

# records the test plugin writes before it idles: the counters then hold still
RECORDS = 300
# the control pages a ring in shm_dir needs besides its data area (service/app.py)
RING_OVERHEAD = 7 * ringcore.PAGE_SIZE


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_yaml_is_lint_clean() -> None:
    # yamllint catches what a YAML loader silently reads another way: a bare
    # `yes` (a boolean in YAML 1.1), duplicate keys, bad indentation
    rules = "{extends: default, rules: {line-length: disable, document-start: disable}}"
    r = subprocess.run(
        [sys.executable, "-m", "yamllint", "-s", "-d", rules, str(DEPLOY)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- promtool


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool (Debian package prometheus) is needed: scripts/setup --test"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_config() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_check_rules() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_promtool_test_rules() -> None:
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def alert_rules() -> list[dict[str, Any]]:
    return [rule for g in read_yaml(PROM_DIR / "alerts.yml")["groups"] for rule in g["rules"]]


def test_alert_rules_are_labelled_annotated_and_unit_tested_both_ways() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for wanted in ("RingNearlyFull", "ReserveFailures", "RecordsAbandoned", "Subscribers", "Down"):
        assert any(wanted in n for n in names), (wanted, names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert set(rule["annotations"]) >= {"summary", "description"}, rule
    tests = read_yaml(PROM_DIR / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for t in tests["tests"] for case in t["alert_rule_test"]]
    for name in names:
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a firing and a not-firing case"


# ---------------------------------------------------------------- live stack


def get_json(url: str) -> Any:
    status, body = http_get(url)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `probe` until it returns something true (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Prometheus:
    """The real server on a copy of deploy/prometheus/, its target swapped."""

    def __init__(
        self,
        tmp: Path,
        target: str,
        config_name: str = "prometheus.yml",
        swap: dict[str, str] | None = None,
    ) -> None:
        exe = shutil.which("prometheus")
        assert exe, "prometheus (Debian package prometheus) is needed: scripts/setup --test"
        conf_dir = tmp / "prometheus"
        shutil.copytree(PROM_DIR, conf_dir)
        text = (PROM_DIR / config_name).read_text()
        for old, new in (
            ("- ringstream:8080", f"- {target}"),
            ("scrape_interval: 15s", "scrape_interval: 1s"),
            ("evaluation_interval: 15s", "evaluation_interval: 1s"),
            *(swap or {}).items(),
        ):
            assert text.count(old) == 1, f"{config_name}: expected one {old!r}"
            text = text.replace(old, new)
        self.config = conf_dir / config_name
        self.config.write_text(text)
        self.log_path = tmp / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._start(exe, tmp)
        except BaseException:
            self.close()
            raise

    def _start(self, exe: str, tmp: Path) -> None:
        for _attempt in range(3):  # the port picked may be taken in between
            self.port = free_port()
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    [
                        exe,
                        f"--config.file={self.config}",
                        f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=tmp,
                )
            if wait_for("Prometheus ready or exited", self._ready_or_exited) == "ready":
                return
            if "address already in use" not in self.log_path.read_text():
                break
        raise AssertionError("Prometheus did not start:\n" + self.log_path.read_text()[-3000:])

    def _ready_or_exited(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return "exited"
        try:
            status, _ = http_get(self.url("/-/ready"))
        except OSError:
            return None
        return "ready" if status == 200 else None

    def url(self, path: str, **params: str) -> str:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return f"http://127.0.0.1:{self.port}{path}{query}"

    def api(self, path: str, **params: str) -> Any:
        status, body = http_get(self.url(f"/api/v1/{path}", **params))
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Prometheus]]:
    """The service with a source of RECORDS records, and Prometheus scraping it."""
    tmp = tmp_path_factory.mktemp("deploy")
    with Service(tmp, BASE_CONFIG + plugin_source(RECORDS)) as svc:
        prom = Prometheus(tmp, f"127.0.0.1:{svc.port}")
        try:
            target = wait_for("the service's target to be up", lambda: up_target(prom, svc))
            assert target["labels"]["job"] == "ringstream"
            yield svc, prom
        finally:
            prom.close()
            svc.terminate()


def up_target(prom: Prometheus, svc: Service) -> dict[str, Any] | None:
    for target in prom.api("targets", state="active")["activeTargets"]:
        if target["scrapeUrl"] == svc.url("/metrics") and target["health"] == "up":
            return target
    return None


def ring_query(svc: Service) -> dict[str, Any]:
    return get_json(svc.url("/query"))


def test_prometheus_scrapes_what_the_service_reports(stack: tuple[Service, Prometheus]) -> None:
    svc, prom = stack
    # the source has written everything and the consumer has taken it: the
    # ring's counters hold still from here on

    def settled() -> dict[str, Any] | None:
        q = ring_query(svc)
        return q if q["submitted"] == RECORDS and q["avail_data"] == 0 else None

    q = wait_for("the plugin's records to be consumed", settled)
    settled_ms = time.time() * 1000

    def scraped_since() -> bool:
        samples = prom.query('ringstream_records_total{outcome="submitted"}[1m]')
        return bool(samples) and float(samples[0]["values"][-1][0]) * 1000 > settled_ms

    wait_for("a scrape after the counters settled", scraped_since)
    assert ring_query(svc) == q
    assert prom.value("ringstream_ring_size_bytes") == q["ring_size"]
    assert prom.value('ringstream_records_total{outcome="submitted"}') == q["submitted"] == RECORDS
    assert prom.value('ringstream_records_total{outcome="discarded"}') == q["discarded"]
    assert prom.value('ringstream_records_total{outcome="abandoned"}') == q["abandoned_records"]
    assert prom.value("ringstream_ring_available_bytes") == q["avail_data"]
    assert prom.value("ringstream_ring_producer_position_bytes_total") == q["producer_pos"]
    assert prom.value("ringstream_ring_consumer_position_bytes_total") == q["consumer_pos"]
    assert prom.value('up{job="ringstream"}') == 1


def test_prometheus_loads_and_evaluates_every_alert_rule(stack: tuple[Service, Prometheus]) -> None:
    _, prom = stack

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for("every rule to be evaluated", evaluated)
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
    for rule in rules:
        assert rule["type"] == "alerting"
        assert rule["health"] == "ok", rule
        # a healthy service: nothing pending, nothing firing
        assert rule["state"] == "inactive", rule


# ---------------------------------------------------------------- Grafana


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_structure() -> None:
    dash = dashboard()
    datasources = read_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        assert p["targets"], p["title"]
        assert {t["refId"] for t in p["targets"]} == {chr(65 + i) for i in range(len(p["targets"]))}
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    exprs = " ".join(e for _, e in panel_queries(dash))
    for needed in (
        r"ringstream_ring_available_bytes\{[^}]*\} / ringstream_ring_size_bytes",
        r"rate\(ringstream_records_total\{",
        r"sum by \(instance, outcome\)",
        r"rate\(ringstream_reserve_failures_total\{",
        r"rate\(ringstream_subscriber_dropped_records_total\{",
        r"rate\(ringstream_subscriber_disconnects_total\{",
        r"sum by \(instance, transport\) \(ringstream_subscribers\{",
        r"histogram_quantile\(0\.5, .*ringstream_delivery_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, .*ringstream_delivery_latency_seconds_bucket",
        r"ringstream_worker_restarts_total\{",
    ):
        assert re.search(needed, exprs), needed
    variables = {v["name"] for v in dash["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", exprs)) - {"__rate_interval"}
    assert used <= variables, used - variables


def live_query(expr: str) -> str:
    """A dashboard query as Grafana sends it for job ringstream, all instances."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('"$job"', '"ringstream"')
        .replace('"$instance"', '".*"')
    )


def test_dashboard_queries_name_live_metrics_and_return_their_series(
    stack: tuple[Service, Prometheus],
) -> None:
    svc, prom = stack
    status, body = http_get(svc.url("/metrics"))
    assert status == 200
    text = body.decode()
    # every sample name the scrape can carry: families with no sample yet
    # (reserve failures before the first one) count by their TYPE line
    sampled = set(re.findall(r"^(ringstream_\w+)[{ ]", text, re.MULTILINE))
    names = set(sampled)
    for name, kind in re.findall(r"^# TYPE (ringstream_\w+) (\w+)", text, re.MULTILINE):
        names |= (
            {name + s for s in ("_bucket", "_count", "_sum")} if kind == "histogram" else {name}
        )
    dash = dashboard()
    variable_queries = [v["query"] for v in dash["templating"]["list"]]
    for expr in [e for _, e in panel_queries(dash)] + variable_queries:
        # forwarding's families exist only with forward.urls set: test_forward
        # checks them against an edge's /metrics
        unknown = set(re.findall(r"\bringstream_(?!forward_)\w+", expr)) - names
        assert not unknown, f"{expr}: not in /metrics: {unknown}"
    # rates need two samples in their 1m window
    wait_for("two scrapes", lambda: prom.query('count_over_time(up{job="ringstream"}[1m]) >= 2'))
    for title, expr in panel_queries(dash):
        result = prom.query(live_query(expr))
        if set(re.findall(r"\bringstream_\w+", expr)) <= sampled:
            assert result, f"{title}: {live_query(expr)} returned no series"


# ---------------------------------------------------------------- compose


def docker_bytes(size: str) -> int:
    m = re.fullmatch(r"([0-9]+)([bkmg]?)", str(size).lower())
    assert m, size
    return int(m.group(1)) << {"": 0, "b": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]


def seconds(duration: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(ms|s|m)", duration)
    assert m, duration
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def mounts(service: dict[str, Any]) -> dict[str, Path | str]:
    """container path -> host path (relative to deploy/) or named volume."""
    out: dict[str, Path | str] = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = (DEPLOY / source).resolve() if source.startswith(".") else source
    return out


def test_compose_file() -> None:
    compose = read_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"ringstream", "prometheus", "grafana"}

    rs = services["ringstream"]
    assert (DEPLOY / rs["build"]["context"]).resolve() == ROOT
    assert rs["build"]["dockerfile"] == "Dockerfile"
    assert re.fullmatch(
        r"\$\{PYTHON_IMAGE:-python:3\.1[1-9][\w.-]*\}", rs["build"]["args"]["PYTHON_IMAGE"]
    )
    cfg = load_config(None, environ=rs["environment"])
    assert rs["ports"] == [f"{cfg['server']['port']}:{cfg['server']['port']}"]
    assert docker_bytes(rs["shm_size"]) >= cfg["ring"]["size"] + RING_OVERHEAD
    assert cfg["ring"]["shm_dir"] == "/dev/shm"
    assert seconds(rs["stop_grace_period"]) == 10 > cfg["server"]["shutdown_timeout"]

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus:v")
    flags = dict(arg.partition("=")[::2] for arg in prom["command"])
    config = Path(flags["--config.file"])
    prom_mounts = mounts(prom)
    assert prom_mounts[str(config.parent)] == PROM_DIR
    assert (PROM_DIR / config.name).is_file()
    assert prom_mounts[flags["--storage.tsdb.path"]] in compose["volumes"]
    scrape = read_yaml(PROM_DIR / config.name)["scrape_configs"]
    targets = [t for job in scrape for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"ringstream:{cfg['server']['port']}"]
    assert prom["ports"] == ["9090:9090"]

    graf = services["grafana"]
    assert graf["image"].startswith("grafana/grafana:")
    graf_mounts = mounts(graf)
    provisioning = Path("/etc/grafana/provisioning")
    for kind in ("datasources", "dashboards"):
        assert graf_mounts[str(provisioning / kind)] == GRAFANA / "provisioning" / kind
    (ds,) = read_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    (provider,) = read_yaml(GRAFANA / "provisioning" / "dashboards" / "ringstream.yml")["providers"]
    dash_dir = provider["options"]["path"]
    assert graf_mounts[dash_dir] == DASHBOARD.parent
    home = Path(graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == dash_dir and (DASHBOARD.parent / home.name).is_file()
    assert graf_mounts["/var/lib/grafana"] in compose["volumes"]
    for service in services.values():
        for host in mounts(service).values():
            assert isinstance(host, str) or host.exists(), host


def test_compose_and_kubernetes_agree_with_the_dockerfile() -> None:
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile at the repository root yet (docker-compose.yml builds it)")
    text = dockerfile.read_text()
    # compose passes the Dockerfile's own default when PYTHON_IMAGE is unset
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    rs = read_yaml(DEPLOY / "docker-compose.yml")["services"]["ringstream"]
    assert rs["build"]["args"]["PYTHON_IMAGE"] == f"${{PYTHON_IMAGE:-{default}}}"
    # the manifests' args go to an entrypoint that runs `ringstream`
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])", text, re.MULTILINE)
    assert json.loads(entrypoint)[-1] == "ringstream"
    # runAsUser is the image's user
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    assert re.search(rf"useradd [^\n]*--uid {pod['securityContext']['runAsUser']}\b", text)
    assert re.search(r"^USER ringstream", text, re.MULTILINE)


# ---------------------------------------------------------------- Kubernetes


def k8s_bytes(quantity: str) -> int:
    m = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi)?", quantity)
    assert m, quantity
    return int(m.group(1)) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30}[m.group(2)]


def k8s_objects() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        obj = read_yaml(path)
        assert obj["metadata"]["name"] == "ringstream", path
        objects[obj["kind"]] = obj
    assert set(objects) == {"ConfigMap", "Deployment", "Service"}
    return objects


def test_kubernetes_manifests(tmp_path: Path) -> None:
    objs = k8s_objects()
    deploy, svc, configmap = objs["Deployment"], objs["Service"], objs["ConfigMap"]
    assert deploy["apiVersion"] == "apps/v1"
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]

    # the service's own loader on the ConfigMap's file and the container's env
    args = c["args"]
    # the image's ENTRYPOINT (tini -g -- ringstream) is kept: args only
    assert "command" not in c and args[0] == "serve"
    config_path = Path(args[args.index("--config") + 1])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    by_path = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    config_volume = by_path[str(config_path.parent)]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    local = tmp_path / config_path.name
    local.write_text(configmap["data"][config_path.name])
    env = {e["name"]: e["value"] for e in c["env"]}
    cfg = load_config(str(local), environ=env)
    workers = plan_workers(cfg.sources, cfg["workers"]["count"])
    assert len(workers) == cfg["workers"]["count"] > 0

    # /dev/shm: a memory-backed emptyDir that holds the ring, within the memory limit
    shm = by_path[cfg["ring"]["shm_dir"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    ring = cfg["ring"]["size"]
    assert "RINGSTREAM_RING_SIZE" in env
    assert ring + RING_OVERHEAD <= k8s_bytes(shm["sizeLimit"]) <= 2 * ring
    memory = k8s_bytes(c["resources"]["limits"]["memory"])
    assert memory >= k8s_bytes(shm["sizeLimit"]) + cfg["subscribers"]["history_bytes"]
    assert k8s_bytes(c["resources"]["requests"]["memory"]) <= memory

    # ports, probes, scrape annotations
    (port,) = c["ports"]
    assert port["containerPort"] == cfg["server"]["port"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(port["containerPort"])
    assert notes["prometheus.io/path"] == "/metrics"

    # shutdown, and not root
    assert pod["spec"]["terminationGracePeriodSeconds"] == 10 > cfg["server"]["shutdown_timeout"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_kubernetes_probe_paths_answer_on_the_service(stack: tuple[Service, Prometheus]) -> None:
    svc, _ = stack
    (c,) = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        path = c[probe]["httpGet"]["path"]
        assert http_get(svc.url(path))[0] == 200, path
    metrics = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    status, body = http_get(svc.url(metrics["prometheus.io/path"]))
    assert status == 200 and b"ringstream_ring_size_bytes" in body


def test_kubernetes_bpf_patch_names_the_deployment_and_its_exec_source() -> None:
    """deploy/k8s/bpf/exec-bpf.patch.yaml: the container it patches exists, the
    env var it sets is the exec source's method, and it asks for the two
    capabilities the BPF method needs (checked here: there is no cluster)."""
    patch = read_yaml(K8S / "bpf" / "exec-bpf.patch.yaml")["spec"]["template"]["spec"]
    objs = k8s_objects()
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    (pc,) = patch["containers"]
    assert pc["name"] == c["name"]
    assert pc["securityContext"]["capabilities"]["add"] == ["BPF", "PERFMON"]
    assert patch["securityContext"]["runAsUser"] == 0 and patch["hostPID"] is True
    assert patch["securityContext"]["seccompProfile"]["type"] == "Unconfined"
    (env,) = pc["env"]
    assert env == {"name": "RINGSTREAM_SOURCES_0_METHOD", "value": "bpf"}
    config = next(iter(objs["ConfigMap"]["data"].values()))
    assert tomllib.loads(config)["sources"][0]["kind"] == "exec"


def test_kubernetes_auth_patch_mounts_what_its_settings_name() -> None:
    """deploy/k8s/auth/: the patched container exists, its env vars are
    settings whose files lie in the mounted Secret, the Secret's mode keeps
    the files from other users, and the scrape job sends the metrics token."""
    from service.settings import env_layer

    patch = read_yaml(K8S / "auth" / "auth.patch.yaml")["spec"]["template"]["spec"]
    (c,) = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    (pc,) = patch["containers"]
    assert pc["name"] == c["name"]
    env = {e["name"]: e["value"] for e in pc["env"]}
    sections, _ = env_layer(env)  # every one a real setting, or this raises
    assert sections["auth"]["mode"] == "token"
    (mount,) = pc["volumeMounts"]
    (volume,) = patch["volumes"]
    assert volume["name"] == mount["name"] and mount["readOnly"] is True
    assert volume["secret"]["defaultMode"] == 0o440
    for key in ("tokens_file", "metrics_token_file"):
        path = Path(sections["auth"][key])
        assert path.parent == Path(mount["mountPath"]), key
    (job,) = read_yaml(K8S / "auth" / "prometheus-scrape.yaml")
    assert job["job_name"] == "ringstream"  # what alerts.yml selects
    assert job["authorization"]["credentials_file"].endswith("/metrics_token")
