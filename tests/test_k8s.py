"""The Kubernetes manifests: both overlays render with `kubectl kustomize` (Debian's kubectl) and
every object validates against its schema; the things that break deployments are asserted.

No cluster runs here. Schemas: Kubernetes core/apps kinds and the Prometheus Operator CRDs
(ServiceMonitor, PodMonitor, PrometheusRule) from the cloudcoil pydantic models
(`cloudcoil-models-kubernetes`, `cloudcoil-models-prometheus-operator`, generated from the
upstream OpenAPI/CRD schemas), checked strictly (an unknown key anywhere fails); KubeRay's
RayService from `tests/k8s_schema.py`, a pydantic model of the fields used here written from
ray-project/kuberay `ray-operator/config/crd/bases/ray.io_rayservices.yaml`, with the pod
templates validated as Kubernetes PodTemplateSpecs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_schema import RayService, strict

from ecoserve.ops.alerts import RULES_FILE
from ecoserve.ops.dashboards import DASHBOARDS_DIR
from ecoserve.ops.k8s import K8S_DIR as K8S_REL
from ecoserve.ops.k8s import rendered_files
from serving.config import parse_serving

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / K8S_REL

KUBECTL = shutil.which("kubectl")


def test_generated_k8s_files_are_not_stale():
    for path, text in rendered_files(K8S_DIR).items():
        assert path.read_text() == text, f"{path} is stale: run `ecoserve k8s generate`"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (make test installs Debian's kubectl package)")
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S_DIR, root)
    # the Secret's values come from a git-ignored env file; render with the committed example
    shutil.copy(root / "base" / "secrets.env.example", root / "base" / "secrets.env")
    out = {}
    for overlay in ("cpu", "gpu"):
        proc = subprocess.run([KUBECTL, "kustomize", str(root / "overlays" / overlay)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_every_object_validates_against_its_schema(rendered):
    from cloudcoil.models.kubernetes.apps.v1 import StatefulSet
    from cloudcoil.models.kubernetes.core.v1 import ConfigMap, PodTemplateSpec, Secret, Service
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor

    models = {"Service": Service, "Secret": Secret, "ConfigMap": ConfigMap, "StatefulSet": StatefulSet,
              "ServiceMonitor": ServiceMonitor, "PodMonitor": PodMonitor, "PrometheusRule": PrometheusRule}
    for overlay, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert kinds == set(models) | {"RayService"}, (overlay, kinds)
        for o in objs:
            if o["kind"] == "RayService":
                rs = RayService.model_validate(o)
                groups = [rs.spec.rayClusterConfig.headGroupSpec, *rs.spec.rayClusterConfig.workerGroupSpecs]
                for g in groups:
                    strict(PodTemplateSpec, g.template)
            else:
                strict(models[o["kind"]], o)


def test_serve_config_is_the_local_config(rendered):
    for overlay, source in (("cpu", "ecoserve.yaml"), ("gpu", "ecoserve-gpu.yaml")):
        rs = _by_kind(rendered[overlay], "RayService")[0]
        serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
        local = yaml.safe_load((K8S_DIR / source).read_text())
        assert serve["applications"] == local["applications"], overlay
        parse_serving(serve["applications"][0]["args"])  # valid ecoserve settings
        assert serve["applications"][0]["import_path"] == "serving.app:build_app"


def test_secret_references_resolve(rendered):
    for overlay, objs in rendered.items():
        secrets = {s["metadata"]["name"]: set(s.get("data", {})) | set(s.get("stringData", {})) for s in _by_kind(objs, "Secret")}
        refs: list[tuple[str, str]] = []

        def walk(node, refs=refs):
            if isinstance(node, dict):
                if "secretKeyRef" in node:
                    refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(objs)
        assert refs, "no secret references at all"
        for name, key in refs:
            assert name in secrets and key in secrets[name], (overlay, name, key)
        # the token and the store URL reach the app only through the Secret, never in clear
        rs = _by_kind(objs, "RayService")[0]
        text = json.dumps(rs)
        assert "REPLACE" not in text and "postgresql://" not in text
        serve = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
        assert serve["auth"]["feedback_token_env"] == "ECOSERVE_FEEDBACK_TOKEN"
        assert serve["telemetry"]["store_url_env"] == "ECOSERVE_STORE_URL"


def _containers(rs):
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, g in groups:
        for c in g["template"]["spec"]["containers"]:
            yield name, c


def test_gpu_only_in_the_gpu_overlay_and_resources_everywhere(rendered):
    for overlay, objs in rendered.items():
        rs = _by_kind(objs, "RayService")[0]
        gpu_groups = []
        for group, c in _containers(rs):
            res = c["resources"]
            assert res["requests"] and res["limits"], (overlay, group)
            if "nvidia.com/gpu" in res["limits"]:
                gpu_groups.append(group)
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
            assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1"
            assert "value" not in env["ECOSERVE_FEEDBACK_TOKEN"]
        assert gpu_groups == (["gpu"] if overlay == "gpu" else []), overlay
        args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
        if overlay == "gpu":
            assert args["provider"] == "cuda" and 0 < args["members"]["num_gpus"] < 1
        else:
            assert args["members"]["num_gpus"] == 0
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
        init = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]
        assert init["command"][:2] == ["ecoserve", "build-models"]


def test_rules_and_dashboards_come_from_the_committed_sources(rendered):
    for _overlay, objs in rendered.items():
        rule = _by_kind(objs, "PrometheusRule")[0]
        assert rule["spec"]["groups"] == yaml.safe_load((ROOT / RULES_FILE).read_text())["groups"]
        cm = [c for c in _by_kind(objs, "ConfigMap") if c["metadata"]["name"] == "ecoserve-dashboards"][0]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        committed = {p.name: p.read_text() for p in (ROOT / DASHBOARDS_DIR).glob("*.json")}
        assert cm["data"] == committed
        sm = _by_kind(objs, "ServiceMonitor")[0]
        svc = [s for s in _by_kind(objs, "Service") if s["metadata"]["name"] == "ecoserve"][0]
        assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
