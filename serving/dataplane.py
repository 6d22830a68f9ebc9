"""Every served ecosystem behind one object: model lookup, metadata, inference. No HTTP.

A model name is an ecosystem (`digits`: routed by its policy) or one member
(`digits.mlp_a`: that member serves, the others still shadow, and it is recorded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.manifest import EcosystemManifest, ManifestError, MemberSpec, load_manifest
from models.runtime import InputError, validate_input
from serving.config import ServingConfig
from serving.ensemble import EcosystemRunner, InferResult, OutcomeSink
from serving.errors import BadRequest, NotFound, PayloadTooLarge
from serving.members import MemberCall
from serving.policies import make_policy
from serving.protocol import (
    InferRequest,
    datatype_of,
    row_candidates,
    row_groups,
    row_request_ids,
    tensor_from_input,
)
from serving.remote_member import HttpMember
from telemetry.estimation import SystemicEstimator
from telemetry.serving_stats import ServingStats

__all__ = ["Dataplane", "MemberFactory", "ResolvedModel", "SERVER_NAME", "SERVER_VERSION"]

log = logging.getLogger(__name__)

SERVER_NAME = "ecoserve"
SERVER_VERSION = "0.1.0"
MemberFactory = Callable[[Path, EcosystemManifest, MemberSpec], MemberCall]


@dataclass(frozen=True)
class ResolvedModel:
    runner: EcosystemRunner
    member: int | None  # None: the ecosystem, routed by its policy

    @property
    def name(self) -> str:
        eco = self.runner.manifest.name
        return eco if self.member is None else f"{eco}.{self.runner.names[self.member]}"

    @property
    def version(self) -> str:
        return self.runner.version if self.member is None else self.runner.versions[self.member]


class Dataplane:
    def __init__(self, runners: dict[str, EcosystemRunner], cfg: ServingConfig, stats: ServingStats,
                 manifests: dict[str, EcosystemManifest] | None = None) -> None:
        self.runners = runners
        self.cfg = cfg
        self.stats = stats
        # every served ecosystem's manifest, those without an inference endpoint included (their
        # members are all external: they take outcomes only, POST /v2/outcomes)
        self.manifests = manifests if manifests is not None else {n: r.manifest for n, r in runners.items()}

    @classmethod
    def build(cls, cfg: ServingConfig, factory: MemberFactory, sink: OutcomeSink | None = None) -> Dataplane:
        repo = Path(cfg.model_repository)
        stats = ServingStats()
        runners = {}
        manifests = {}
        for name, eco_cfg in cfg.ecosystems.items():
            try:
                manifest = load_manifest(repo / name)
            except ManifestError as exc:
                raise ManifestError(f"ecosystem {name!r}: {exc}") from exc
            current = {m.name: m for m in manifest.served_members(eco_cfg.versions)}
            wanted = list(eco_cfg.members or current)
            unknown = [w for w in wanted if w not in current]
            if unknown:
                raise ManifestError(f"ecosystems.{name}.members: {unknown[0]!r} is not a member of {repo / name}")
            manifests[name] = manifest
            served = [w for w in wanted if current[w].kind != "external"]  # external: outputs arrive from outside
            if not served:
                continue  # outcomes only: no inference endpoint
            if eco_cfg.policy is None:
                raise ManifestError(f"ecosystems.{name}.policy: required (members {', '.join(served)} are served here)")
            # a remote member is called over HTTP wherever the others run (serving.remote_member)
            members = [HttpMember(manifest, current[w]) if current[w].kind == "remote"
                       else factory(repo / name, manifest, current[w]) for w in served]
            for mem in members:
                log.info("ecosystem %s: member %s v%s on %s", name, mem.name, mem.version, mem.provider)
            policy = make_policy([m.name for m in members], eco_cfg.policy)
            names = [m.name for m in members]
            candidates = {names.index(member): factory(repo / name, manifest, manifest.member(member, version))
                          for member, version in eco_cfg.candidates.items() if member in names}
            for a, cand in candidates.items():
                log.info("ecosystem %s: candidate %s v%s in shadow of v%s", name, cand.name, cand.version,
                         members[a].version)
            runners[name] = EcosystemRunner(manifest, members, policy, eco_cfg, sink, stats=stats, candidates=candidates)
            runners[name].score_vectors = 0 < len(manifest.classes) <= cfg.telemetry.score_vector_max_classes
        return cls(runners, cfg, stats, manifests)

    # ------------------------------------------------------------ lookup
    def resolve(self, name: str, version: str | None = None) -> ResolvedModel:
        eco, _, member = name.partition(".")
        runner = self.runners.get(eco)
        if runner is None and eco in self.manifests:
            raise NotFound(f"ecosystem {eco!r} takes outcomes only (POST /v2/outcomes): its members are external")
        if runner is None:
            raise NotFound(f"unknown model {name!r}; served models: {', '.join(self.model_names())}")
        resolved = ResolvedModel(runner, None)
        if member:
            if member not in runner.names:
                raise NotFound(f"unknown model {name!r}: ecosystem {eco!r} has members {', '.join(runner.names)}")
            resolved = ResolvedModel(runner, runner.index(member))
        if version is not None and version != resolved.version:
            raise NotFound(f"model {name!r} has no served version {version!r} (served: {resolved.version})")
        return resolved

    def apply_estimators(self, fitted: dict[str, str]) -> None:
        """Install the fitted label-free estimators (JSON, from a recorder's reply) on their
        runners, for the per-row `systemic_failure_risk`; one fitted for another member list is
        ignored (the recorder refits it)."""
        for eco, text in fitted.items():
            runner = self.runners.get(eco)
            if runner is None:
                continue
            try:
                est = SystemicEstimator.from_json(text)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignored an estimator for %s that could not be read: %s", eco, exc)
                continue
            if est.members == runner.names:
                runner.estimator = est

    def model_names(self) -> list[str]:
        names = []
        for eco, r in self.runners.items():
            names.append(eco)
            names.extend(f"{eco}.{m}" for m in r.names)
        return names

    # ---------------------------------------------------------- metadata
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["ecosystem", "feedback"]}

    def model_metadata(self, model: ResolvedModel) -> dict[str, Any]:
        r = model.runner
        man = r.manifest
        meta: dict[str, Any] = {
            "name": model.name,
            "versions": [model.version],
            "platform": "onnxruntime_onnx" if model.member is not None else "ecoserve_ecosystem",
            "inputs": [
                {"name": man.input.name, "datatype": datatype_of(man.input.dtype), "shape": list(man.input.shape)}
            ],
            "outputs": (
                [{"name": "value", "datatype": "FP64", "shape": [-1]}] if r.regression else [
                    {"name": "ranking", "datatype": "INT64", "shape": [-1, r.k]},
                    {"name": "scores", "datatype": "FP32", "shape": [-1, r.k]},
                ] if r.k else [
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(man.classes)]},
                ]
            ),
        }
        members = [
            {
                "name": r.names[a],
                "version": r.versions[a],
                "provider": r.members[a].provider,
                "compressed": man.member(r.names[a], r.versions[a]).compressed,
            }
            for a in range(len(r.names))
        ]
        params: dict[str, Any] = {"task": man.task, "subgroups": {k: list(v) for k, v in man.subgroups.items()}}
        if man.regression is not None:
            params["regression"] = {"tolerance": man.regression.tolerance, "range": list(man.regression.range),
                                    "bin_width": man.regression.width, "bins": man.regression.n_bins}
        elif man.ranking is not None:
            params["ranking"] = {"k": man.ranking.k, "items": list(man.classes), "no_click": man.ranking.no_click,
                                 "position_shuffle_rate": r.cfg.position_shuffle_rate}
        else:
            params["classes"] = list(man.classes)
        if model.member is None:
            params.update(members=members, policy=r.policy.kind)
            if r.candidates:  # candidate versions in shadow: recorded, never served
                params["candidates"] = [{"member": r.names[a], "version": c.version, "serving_version": r.versions[a],
                                         "share": r.cfg.candidate_share} for a, c in r.candidates]
        else:
            params.update(provider=members[model.member]["provider"], ecosystem=man.name)
        meta["parameters"] = params
        return meta

    # --------------------------------------------------------- inference
    async def infer(self, model: ResolvedModel, req: InferRequest, header_id: str | None) -> tuple[InferResult, str]:
        r = model.runner
        man = r.manifest
        if len(req.inputs) != 1:
            names = ", ".join(repr(i.name) for i in req.inputs)
            raise BadRequest(f"expected exactly one input tensor {man.input.name!r}, got {len(req.inputs)} ({names})")
        x = tensor_from_input(req.inputs[0], man.input.name, man.input.dtype, man.input.row_shape)
        if x.shape[0] > self.cfg.limits.max_rows_per_request:
            raise PayloadTooLarge(
                f"{x.shape[0]} rows in one request; the limit is {self.cfg.limits.max_rows_per_request}"
            )
        try:
            x = validate_input(man.input, x)
        except InputError as exc:
            raise BadRequest(str(exc)) from exc
        n = x.shape[0]
        request_id, ids = row_request_ids(req, header_id, n)
        groups = row_groups(req, list(man.subgroups), n)
        candidates = row_candidates(req, man.classes, man.ranking.k, n) if man.ranking is not None else None
        if candidates is None and req.parameters and req.parameters.get("candidates") is not None:
            raise BadRequest(f"parameters.candidates: {man.name!r} is a {man.task} ecosystem; candidates are for "
                             "ranking")
        result = await r.infer(x, ids, groups, model.member, candidates)
        return result, request_id

    def response(self, model: ResolvedModel, req: InferRequest, result: InferResult, request_id: str) -> dict[str, Any]:
        """The inference response; each output's `data` is a flat numpy array, which the transport
        writes as JSON or binary (`serving.binary.encode_response`) or as gRPC contents."""
        n = result.labels.shape[0]
        if model.runner.regression:  # a served value is never missing (else a fallback served)
            outputs = {"value": {"name": "value", "datatype": "FP64", "shape": [n], "data": result.labels}}
        elif result.ranking is not None and result.ranking_scores is not None:  # the shown list, slot order
            k = result.ranking.shape[1]
            outputs = {"ranking": {"name": "ranking", "datatype": "INT64", "shape": [n, k],
                                   "data": result.ranking.reshape(-1)},
                       "scores": {"name": "scores", "datatype": "FP32", "shape": [n, k],
                                  "data": result.ranking_scores.reshape(-1)}}
        else:
            outputs = {"label": {"name": "label", "datatype": "INT64", "shape": [n], "data": result.labels}}
        if result.probabilities is not None and result.ranking is None:
            outputs["probabilities"] = {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(result.probabilities.shape),
                "data": result.probabilities.reshape(-1),
            }
        wanted = [o.name for o in req.outputs] if req.outputs else list(outputs)
        unknown = [w for w in wanted if w not in outputs]
        if unknown:
            raise BadRequest(f"unknown output {unknown[0]!r}; outputs: {', '.join(outputs)}")
        names = model.runner.names
        oc = result.outcomes
        params: dict[str, Any] = {
            "request_ids": [o.request_id for o in oc],
            "served_members": [names[o.served] for o in oc],
            "propensities": [o.propensity for o in oc],
            "fallback": [o.fallback for o in oc],
            "policy": oc[0].policy,
        }
        if result.ranking is not None and result.slot_propensities is not None:
            items = model.runner.manifest.classes
            params["ranked_items"] = [[items[int(i)] for i in row] for row in result.ranking.tolist()]
            params["slot_propensities"] = [[round(float(p), 6) for p in row] for row in result.slot_propensities]
        if result.risks is not None:  # for recourse: send high-risk rows to a person (docs/serving.md)
            params["systemic_failure_risks"] = [round(float(r), 4) for r in result.risks]
        if n == 1:
            params.update(request_id=oc[0].request_id, served_member=names[oc[0].served], propensity=oc[0].propensity)
            if result.risks is not None:
                params["systemic_failure_risk"] = params["systemic_failure_risks"][0]
        return {
            "model_name": model.name,
            "model_version": model.version,
            "id": request_id,
            "parameters": params,
            "outputs": [outputs[w] for w in wanted],
        }

