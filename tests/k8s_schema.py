"""A pydantic model of the KubeRay RayService fields these manifests use (no package ships its
schema), written from ray-project/kuberay `ray-operator/config/crd/bases/ray.io_rayservices.yaml`
(apiVersion ray.io/v1). `extra="forbid"` everywhere: a misspelt field fails. Plus `strict()`,
which makes the permissive cloudcoil models reject unknown keys too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(_Forbid):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class HeadGroupSpec(_Forbid):
    rayStartParams: dict[str, str]  # CRD: additionalProperties: {type: string}
    template: dict[str, Any]  # validated as a core/v1 PodTemplateSpec by the tests
    serviceType: str | None = None
    enableIngress: bool | None = None


class WorkerGroupSpec(_Forbid):
    groupName: str
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    rayStartParams: dict[str, str]
    template: dict[str, Any]


class RayClusterSpec(_Forbid):
    rayVersion: str
    enableInTreeAutoscaling: bool | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec]


class RayServiceSpec(_Forbid):
    serveConfigV2: str
    rayClusterConfig: RayClusterSpec
    serviceUnhealthySecondThreshold: int | None = None
    deploymentUnhealthySecondThreshold: int | None = None


class RayService(_Forbid):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: Metadata
    spec: RayServiceSpec


def _unknown(given: Any, kept: Any, path: str) -> list[str]:
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return []
        out = []
        for k, v in given.items():
            if k not in kept:
                out.append(f"{path}.{k}")
            else:
                out += _unknown(v, kept[k], f"{path}.{k}")
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept)) for p in _unknown(a, b, f"{path}[{i}]")]
    return []


def strict(model: type, obj: dict[str, Any]) -> Any:
    """Validate with a (permissive) cloudcoil model, then fail on any key the model dropped."""
    m = model.model_validate(obj)
    kept = m.model_dump(mode="json", by_alias=True, exclude_unset=True)
    unknown = _unknown(obj, kept, model.__name__)
    assert not unknown, f"fields not in the {model.__name__} schema: {unknown}"
    return m
