"""The k8s/ kustomize base validates offline, and its dashboard and alerts use only real metrics.

* core kinds: kubernetes-validate, strict (unknown fields fail), including RayCluster pod templates;
* RayCluster / ServiceMonitor / PodMonitor / PrometheusRule: the JSON schemas in k8s/schemas/;
* alert rules: `promtool check rules` and `promtool test rules` (k8s/tests/alerts_test.yaml) when
  promtool is installed; PromQL in alerts and dashboard always goes through a small parser too;
* every k2serve_* name in the dashboard and the alerts is in router/worker METRICS;
* cross-references (names, selectors, ports) between the manifests hold.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from k2serve.router.metrics import METRICS as ROUTER_METRICS
from k2serve.worker.metrics import METRICS as WORKER_METRICS

K8S = Path(__file__).resolve().parent.parent / "k8s"
REPO = K8S.parent
K8S_VERSION = "1.33"  # grpc probes (1.27 GA) and NetworkPolicy endPort (1.25 GA) are stable here
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
}


# ---- rendering the base like `kustomize build` (resources + configMapGenerator + namespace) ----

def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def generated_configmaps(kust: dict) -> list[dict]:
    maps = []
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=") if "=" in entry else (entry, "", entry)
            data[key or path] = (K8S / path).read_text()
        labels = dict(gen.get("options", {}).get("labels", {}))
        maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"], "labels": labels}, "data": data})
    return maps


def rendered() -> list[dict]:
    """All objects of the base, with the kustomization's namespace applied."""
    kust = kustomization()
    docs = [d for f in kust["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]
    docs += generated_configmaps(kust)
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kust["namespace"]
    return docs


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return rendered()


def one(objects, kind, name=None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(raycluster: dict) -> dict[str, dict]:
    spec = raycluster["spec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    for group in spec["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates


# ---- kustomization and files ---------------------------------------------------------------------

def test_kustomization_lists_exactly_the_files_present():
    kust = kustomization()
    listed = list(kust["resources"])
    for gen in kust.get("configMapGenerator", []):
        listed += [f.rpartition("=")[2] for f in gen["files"]]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    present = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml", ".json")}
    assert set(listed) == present - {"kustomization.yaml"}


def test_rdma_component_lists_exactly_its_patches():
    comp_dir = K8S / "components" / "rdma"
    comp = yaml.safe_load((comp_dir / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    patches = {p["path"] for p in comp["patches"]}
    assert patches == {p.name for p in comp_dir.iterdir()} - {"kustomization.yaml"}


# ---- core kinds: kubernetes-validate, strict ---------------------------------------------------

def strict_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kv.validate(doc, K8S_VERSION, strict=True)


def test_core_manifests_validate_strictly(objects):
    core = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRD_SCHEMAS]
    assert {o["kind"] for o in core} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment",
                                         "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                         "NetworkPolicy"}
    for doc in core:
        strict_validate(doc)


def as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate",
            "metadata": {"name": name, "namespace": "k2serve"}, "template": template}


def test_raycluster_pod_templates_validate_strictly(objects):
    for name, template in pod_templates(one(objects, "RayCluster")).items():
        strict_validate(as_pod_template(template, name))


def test_strict_validation_rejects_unknown_fields(objects):
    kv = pytest.importorskip("kubernetes_validate")
    bad = copy.deepcopy(one(objects, "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


# ---- CRDs: JSON schemas in the repo ---------------------------------------------------------------

def crd_validator(api_version: str, kind: str):
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_custom_resources_validate_against_schemas(objects):
    crs = [o for o in objects if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    assert {o["kind"] for o in crs} == {k for _, k in CRD_SCHEMAS}
    for doc in crs:
        crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)


@pytest.mark.parametrize("kind, path, field", [
    ("RayCluster", ("spec", "workerGroupSpecs", 0), "gpus"),
    ("RayCluster", ("spec", "headGroupSpec"), "replica"),
    ("ServiceMonitor", ("spec", "endpoints", 0), "intervall"),
    ("PodMonitor", ("spec",), "podMetricEndpoints"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), "expression"),
])
def test_schemas_reject_unknown_fields(objects, kind, path, field):
    doc = copy.deepcopy(one(objects, kind))
    node = doc
    for key in path:
        node = node[key]
    node[field] = "x"
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(doc["apiVersion"], kind).validate(doc)


def test_schemas_enforce_types(objects):
    doc = copy.deepcopy(one(objects, "RayCluster"))
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 8  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        crd_validator("ray.io/v1", "RayCluster").validate(doc)
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "1 minute"
    with pytest.raises(jsonschema.ValidationError):
        crd_validator("monitoring.coreos.com/v1", "PrometheusRule").validate(rule)


# ---- the RDMA component (a JSON 6902 patch of the RayCluster) ----------------------------------

def json_patch(doc: dict, ops: list[dict]) -> dict:
    """Apply the RFC 6902 subset kustomize patches use here: test, replace, add."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if op["op"] == "test":
            actual = node[int(last)] if isinstance(node, list) else node[last]
            assert actual == op["value"], f"test failed at {op['path']}: {actual!r} != {op['value']!r}"
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        elif op["op"] in ("add", "replace"):
            if isinstance(node, list):
                node[int(last)] = op["value"]
            else:
                assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
                node[last] = op["value"]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def test_rdma_component_patches_a_valid_raycluster(objects):
    ops = yaml.safe_load((K8S / "components" / "rdma" / "raycluster-rdma.yaml").read_text())
    patched = json_patch(one(objects, "RayCluster"), ops)
    crd_validator("ray.io/v1", "RayCluster").validate(patched)
    worker = patched["spec"]["workerGroupSpecs"][0]["template"]
    strict_validate(as_pod_template(worker, "worker-rdma"))
    container = worker["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] and env["NCCL_SOCKET_IFNAME"]
    assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]


# ---- RayCluster shape --------------------------------------------------------------------------

def container(template: dict, name: str) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def test_raycluster_head_runs_controller_without_gpus(objects):
    head = pod_templates(one(objects, "RayCluster"))["head"]
    assert one(objects, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for c in head["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    cmd = container(head, "controller")["command"]
    assert cmd[:2] == ["k2serve", "serve"] and "--address" in cmd
    assert cmd[cmd.index("--config") + 1] == "/etc/k2serve/cluster.yaml"


def test_raycluster_workers_are_8_gpu_nodes_with_shm_nccl_and_readiness(objects):
    rc = one(objects, "RayCluster")
    group = rc["spec"]["workerGroupSpecs"][0]
    assert group["rayStartParams"]["num-gpus"] == "8"
    spec = group["template"]["spec"]
    c = container(group["template"], "ray-worker")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    env = {e["name"] for e in c["env"]}
    assert "NCCL_SOCKET_IFNAME" in env and any(n.startswith("NCCL_IB_") for n in env)
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # Ready while the group can generate: rank 0's plain-HTTP port (the gRPC port requires TLS and a token).
    metrics_port = next(p for p in c["ports"] if p["name"] == "metrics")
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": metrics_port["name"]}
    assert "livenessProbe" not in c and "startupProbe" not in c  # a group loads for minutes; the controller replaces it


def test_worker_pods_drain_their_group_before_they_stop(objects):
    """SIGTERM reaches the pod's Ray node only after preStop `k2serve drain` has drained the group, within
    the grace period: drain_timeout_s for the requests in flight, then drain's own wait for the exit."""
    from k2serve.cluster.config import ClusterConfig

    group = one(objects, "RayCluster")["spec"]["workerGroupSpecs"][0]
    c = container(group["template"], "ray-worker")
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["k2serve", "drain"] and command[command.index("--config") + 1] == "/etc/k2serve/cluster.yaml"
    config = ClusterConfig.from_yaml(cluster_yaml(objects)).controller
    assert config.worker_pid_dir, "rank 0 writes no pid file: `k2serve drain` would find no group"
    drain_wait = config.drain_timeout_s + 15  # drain_cli's default --timeout
    assert group["template"]["spec"]["terminationGracePeriodSeconds"] > drain_wait


def test_security_is_on_and_every_k2serve_container_has_its_files(objects):
    """TLS with the shared token by default; the Secret is mounted where cluster.yaml says, in the router,
    the controller and the workers; the router reaches the controller over https."""
    from k2serve.cluster.config import ClusterConfig

    security = ClusterConfig.from_yaml(cluster_yaml(objects)).security
    assert security.tls and security.client_auth == "token"
    files = [security.ca_file, security.cert_file, security.key_file, security.token_file]
    templates = pod_templates(one(objects, "RayCluster"))
    router = one(objects, "Deployment", "k2serve-router")["spec"]["template"]
    for template, name in ((router, "router"), (templates["head"], "controller"), (templates["gpu-8x"], "ray-worker")):
        c = container(template, name)
        secrets = {v["name"]: v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v}
        mounts = [m["mountPath"] for m in c["volumeMounts"] if secrets.get(m["name"]) == "k2serve-tls"]
        assert mounts and all(any(f.startswith(m + "/") for m in mounts) for f in files), name
    command = container(router, "router")["command"]
    assert command[command.index("--discovery") + 1].startswith("https://")


def test_volumes_reference_existing_objects(objects):
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    templates = list(pod_templates(one(objects, "RayCluster")).values())
    templates.append(one(objects, "Deployment")["spec"]["template"])
    for template in templates:
        for vol in template["spec"].get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims


# ---- router objects ------------------------------------------------------------------------------

def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_router_service_hpa_pdb_target_the_deployment(objects):
    dep = one(objects, "Deployment", "k2serve-router")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][0] == "k2serve"
    assert matches(one(objects, "Service", "k2serve-router")["spec"]["selector"], pod_labels)
    port_names = {p["name"] for p in c["ports"]}
    assert one(objects, "Service", "k2serve-router")["spec"]["ports"][0]["targetPort"] in port_names
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "k2serve-router"}
    assert matches(one(objects, "PodDisruptionBudget", "k2serve-router")["spec"]["selector"]["matchLabels"],
                   pod_labels)
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"


def test_monitors_select_real_ports(objects):
    svc = one(objects, "Service", "k2serve-router")
    sm = one(objects, "ServiceMonitor")
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    worker = pod_templates(one(objects, "RayCluster"))["gpu-8x"]
    worker_ports = {p["name"] for c in worker["spec"]["containers"] for p in c.get("ports", [])}
    pm = one(objects, "PodMonitor")
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= worker_ports
    # KubeRay labels every pod of the cluster with ray.io/cluster=<RayCluster name>.
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": one(objects, "RayCluster")["metadata"]["name"]}


def test_networkpolicy_admits_only_router_and_head_to_worker_grpc(objects):
    rc = one(objects, "RayCluster")
    templates = pod_templates(rc)
    worker_labels = templates["gpu-8x"]["metadata"]["labels"]
    router_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    head_labels = templates["head"]["metadata"]["labels"]
    np = one(objects, "NetworkPolicy")
    assert matches(np["spec"]["podSelector"]["matchLabels"], worker_labels)
    assert np["spec"]["policyTypes"] == ["Ingress"]

    def admits(rule, port):
        return any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])

    grpc_rules = [r for r in np["spec"]["ingress"] if admits(r, 50051)]
    sources = [peer for r in grpc_rules for peer in r["from"]]
    assert all(set(peer) == {"podSelector"} for peer in sources), "no namespace-wide access to gRPC"
    allowed = [peer["podSelector"]["matchLabels"] for peer in sources]
    assert any(matches(sel, router_labels) for sel in allowed)
    assert any(matches(sel, head_labels) for sel in allowed)
    assert not any(matches(sel, worker_labels) and "ray.io/cluster" not in sel for sel in allowed)
    assert not any("ray.io/cluster" in sel for sel in allowed), "other Ray pods must not reach gRPC"


# ---- cluster config in the ConfigMap --------------------------------------------------------------

def cluster_yaml(objects) -> str:
    return one(objects, "ConfigMap", "k2serve-cluster-config")["data"]["cluster.yaml"]


def test_cluster_config_keys_and_plausibility(objects):
    """Plain-YAML check of the keys cluster/config.py reads (runs whether or not it exists)."""
    cfg = yaml.safe_load(cluster_yaml(objects))
    assert cfg["model"]["path"].startswith("/models/")
    assert {"host", "port", "policy"} <= set(cfg["router"])
    assert {"max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_fraction"} <= set(cfg["engine"])
    assert 0 < cfg["engine"]["kv_cache_fraction"] <= 1
    names = [g["name"] for g in cfg["groups"]]
    assert len(names) == len(set(names))
    for group in cfg["groups"]:
        assert (group["tp"], group["ep"], group["device"]) == (8, 8, "cuda"), group
    # One group per 8-GPU worker pod; the router listens where the Service sends traffic.
    assert len(cfg["groups"]) == one(objects, "RayCluster")["spec"]["workerGroupSpecs"][0]["replicas"]
    router = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert cfg["router"]["port"] == router["ports"][0]["containerPort"]


def lead_cluster_config():
    """k2serve.cluster.config.ClusterConfig when the lead's loader exists and has from_yaml, else None."""
    if importlib.util.find_spec("k2serve.cluster.config") is None:
        return None
    from k2serve.cluster import config

    cls = getattr(config, "ClusterConfig", None)
    return cls if hasattr(cls, "from_yaml") else None


@pytest.mark.skipif(lead_cluster_config() is None,
                    reason="cluster/config.py ClusterConfig.from_yaml not present yet; "
                           "test_cluster_config_keys_and_plausibility checks the YAML keys meanwhile")
def test_cluster_config_loads_with_cluster_config(objects):
    """The ConfigMap's YAML loads with the real ClusterConfig.from_yaml."""
    config = lead_cluster_config().from_yaml(cluster_yaml(objects))
    assert [g.name for g in config.groups] == ["b200-0", "b200-1"]
    assert all((g.tp, g.ep) == (8, 8) for g in config.groups)


# ---- PromQL: alerts and dashboard ------------------------------------------------------------------

def alert_rules(objects) -> list[dict]:
    return [r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


def dashboard() -> dict:
    return json.loads((K8S / "dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


GRAFANA_RANGE_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so the expression is plain PromQL."""
    for var, value in GRAFANA_RANGE_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", "x", expr)  # template variables live only inside label values


# ---- a small PromQL parser: the fallback syntax check when promtool is absent ----------------------

class PromQLError(ValueError):
    """An expression outside the PromQL subset k2serve uses, or malformed."""


PROMQL_TOKEN = re.compile(r"""\s*(?:
    (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![a-zA-Z_])
  | (?P<duration>\d+(?:ms|[smhdwy]))
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],])
)""", re.X)
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values"}
PARAM_AGGREGATIONS = {"topk", "bottomk", "quantile", "count_values"}
# function -> argument types ("v" instant vector, "m" range vector, "s" scalar); result type
FUNCTIONS = {"rate": ("m", "v"), "irate": ("m", "v"), "increase": ("m", "v"), "delta": ("m", "v"),
             "avg_over_time": ("m", "v"), "max_over_time": ("m", "v"), "min_over_time": ("m", "v"),
             "histogram_quantile": ("sv", "v"), "absent": ("v", "v"), "clamp_min": ("vs", "v"),
             "clamp_max": ("vs", "v"), "abs": ("v", "v"), "scalar": ("v", "s"), "vector": ("s", "v")}
BINARY_PRECEDENCE = [("or",), ("and", "unless"), ("==", "!=", ">", "<", ">=", "<="), ("+", "-"),
                     ("*", "/", "%"), ("^",)]


def promql_tokens(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        m = PROMQL_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise PromQLError(f"cannot tokenize at {expr[pos:pos + 20]!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return tokens


class PromQLParser:
    """Recursive descent over tokens; each parse_* returns the value type: s, v, m or str."""

    def __init__(self, expr: str):
        self.tokens, self.i = promql_tokens(expr), 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok_kind, tok = self.peek()
        if (value is not None and tok != value) or (kind is not None and tok_kind != kind):
            raise PromQLError(f"expected {value or kind}, got {tok or 'end of expression'!r}")
        self.i += 1
        return tok

    def parse(self) -> str:
        kind = self.binary(0)
        if self.peek()[0] != "end":
            raise PromQLError(f"unexpected {self.peek()[1]!r}")
        return kind

    def binary(self, level: int) -> str:
        if level == len(BINARY_PRECEDENCE):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[1] in BINARY_PRECEDENCE[level]:
            self.take()
            if self.peek()[1] == "bool":
                self.take()
            right = self.binary(level + 1)
            if "m" in (left, right) or "str" in (left, right):
                raise PromQLError("binary operators take scalars or instant vectors")
            left = "v" if "v" in (left, right) else "s"
        return left

    def unary(self) -> str:
        if self.peek()[1] in ("-", "+"):
            self.take()
        return self.primary()

    def primary(self) -> str:
        kind, tok = self.peek()
        if kind == "number":
            self.take()
            return "s"
        if kind == "string":
            self.take()
            return "str"
        if tok == "(":
            self.take("(")
            inner = self.binary(0)
            self.take(")")
            return inner
        if tok in AGGREGATIONS:
            return self.aggregation()
        if kind == "ident" and self.peek(1)[1] == "(":
            return self.function()
        if kind == "ident" or tok == "{":
            return self.selector()
        raise PromQLError(f"unexpected {tok or 'end of expression'!r}")

    def grouping(self) -> None:
        if self.peek()[1] in ("by", "without"):
            self.take()
            self.take("(")
            while self.peek()[1] != ")":
                self.take(kind="ident")
                if self.peek()[1] == ",":
                    self.take(",")
            self.take(")")

    def aggregation(self) -> str:
        name = self.take()
        self.grouping()
        self.take("(")
        if name in PARAM_AGGREGATIONS:
            self.binary(0)
            self.take(",")
        if self.binary(0) != "v":
            raise PromQLError(f"{name} aggregates an instant vector")
        self.take(")")
        self.grouping()
        return "v"

    def function(self) -> str:
        name = self.take()
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name}")
        args, result = FUNCTIONS[name]
        self.take("(")
        for n, expected in enumerate(args):
            if n:
                self.take(",")
            got = self.binary(0)
            if got != expected:
                raise PromQLError(f"{name} argument {n + 1}: expected {expected}, got {got}")
        self.take(")")
        return result

    def selector(self) -> str:
        if self.peek()[0] == "ident":
            self.take()
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                self.take(kind="ident")
                if self.take() not in ("=", "!=", "=~", "!~"):
                    raise PromQLError("bad label matcher operator")
                self.take(kind="string")
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
        if self.peek()[1] == "[":
            self.take("[")
            self.take(kind="duration")
            self.take("]")
            return "m"
        return "v"


def check_promql(expr: str) -> None:
    """Raise PromQLError unless ``expr`` is well-formed PromQL of the subset above, with a vector
    or scalar result."""
    if PromQLParser(expr).parse() not in ("v", "s"):
        raise PromQLError(f"expression does not evaluate to a vector or scalar: {expr}")


def test_alert_and_dashboard_promql_parses(objects):
    for rule in alert_rules(objects):
        check_promql(rule["expr"])
    for expr in dashboard_exprs():
        check_promql(grafana_to_promql(expr))


def test_promql_checker_rejects_bad_expressions():
    for bad in ("rate(k2serve_router_requests_total)",            # rate needs a range vector
                "sum(rate(k2serve_router_requests_total[5m])",     # unbalanced
                "histogram_quantile(0.9, foo[5m]) > ",             # dangling operator
                "frobnicate(k2serve_router_requests_total)",       # unknown function
                'k2serve_router_requests_total{status=~"5.."',      # unclosed matcher
                "sum by (le (rate(x[5m]))"):
        with pytest.raises(PromQLError):
            check_promql(bad)


def promtool() -> str | None:
    return shutil.which("promtool")


def write_rules(objects, directory: Path) -> Path:
    path = directory / "alerts.rules.yaml"
    path.write_text(yaml.safe_dump(one(objects, "PrometheusRule")["spec"], sort_keys=False))
    return path


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_check_and_test_rules(objects, tmp_path):
    rules = write_rules(objects, tmp_path)
    shutil.copy(K8S / "tests" / "alerts_test.yaml", tmp_path)
    for args in (["check", "rules", rules.name], ["test", "rules", "alerts_test.yaml"]):
        result = subprocess.run([promtool(), *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_checks_dashboard_expressions(tmp_path):
    rules = [{"record": f"k2serve:dashboard_{i}", "expr": grafana_to_promql(e)}
             for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_promtool_test(objects):
    suite = yaml.safe_load((K8S / "tests" / "alerts_test.yaml").read_text())
    tested = {t["alertname"] for case in suite["tests"] for t in case["alert_rule_test"]
              if t.get("exp_alerts")}
    assert tested == {r["alert"] for r in alert_rules(objects)}
    assert suite["rule_files"] == ["alerts.rules.yaml"]


# ---- metric names ------------------------------------------------------------------------------------

METRIC_NAME = re.compile(r"\bk2serve_[a-zA-Z0-9_]+")


EXPOSED_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                    "histogram": ("_bucket", "_sum", "_count", "_created")}


def exposed_names(spec) -> set[str]:
    """Sample names prometheus_client exposes for one spec (counters' spec names end in _total)."""
    family = spec.name.removesuffix("_total")
    return {family + suffix for suffix in EXPOSED_SUFFIXES[spec.kind]}


def known_metric(name: str) -> bool:
    return any(name in exposed_names(s) for s in ROUTER_METRICS + WORKER_METRICS)


def test_alert_metrics_exist(objects):
    names = {n for r in alert_rules(objects) for n in METRIC_NAME.findall(r["expr"])}
    assert names and not {n for n in names if not known_metric(n)}


def test_dashboard_metrics_exist_and_cover_every_metric():
    queries = dashboard_exprs() + [v["query"]["query"] for v in dashboard()["templating"]["list"]
                                   if v["type"] == "query"]
    names = {n for q in queries for n in METRIC_NAME.findall(q)}
    assert not {n for n in names if not known_metric(n)}, "unknown metrics on the dashboard"
    shown = {s.name for s in ROUTER_METRICS + WORKER_METRICS if names & exposed_names(s)}
    assert shown == {s.name for s in ROUTER_METRICS + WORKER_METRICS}


def test_known_metric_allows_only_exposed_suffixes():
    assert known_metric("k2serve_router_requests_total")
    assert known_metric("k2serve_router_time_to_first_token_seconds_bucket")
    assert not known_metric("k2serve_router_time_to_first_token_seconds_total")
    assert not known_metric("k2serve_router_requests")  # a counter is exposed with _total
    assert not known_metric("k2serve_router_ttft_seconds_bucket")
    assert not known_metric("k2serve_worker_kv_cache_usage_ratio_bucket")  # a gauge has no buckets


# ---- dashboard structure ------------------------------------------------------------------------------

def test_dashboard_structure(objects):
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        used = set(re.findall(r"\$\{?(\w+)\}?", json.dumps(panel)))
        assert used - {"__rate_interval", "__interval"} <= variables, panel["title"]
    cm = one(objects, "ConfigMap", "k2serve-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(next(iter(cm["data"].values()))) == dash


def test_dashboard_has_the_required_panels():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for words in ("request rate", "error", "time to first token", "inter-token", "end-to-end",
                  "tokens per second", "in flight", "kv cache", "hit rate", "preemptions",
                  "step time", "imbalance", "all-to-all time"):
        assert words in titles, words


# ---- Dockerfile ----------------------------------------------------------------------------------------

def test_dockerfile_installs_cuda_torch_and_the_project():
    text = (K8S / "Dockerfile").read_text()
    assert re.search(r"^FROM .*cuda", text, re.M | re.I)
    assert re.search(r"pip install \"torch==\$\{TORCH_VERSION\}\" --index-url", text)
    assert re.search(r"pip install -c \S+ \.", text), "the project installs with the lock's constraints"
    assert re.search(r'^ENTRYPOINT \[.*"k2serve"\]', text, re.M)
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / src).exists(), f"Dockerfile copies missing path {src}"
