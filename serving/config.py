"""The application config: one pydantic model per concern, read once and passed down.

The file `ecoserve serve` reads is a Ray Serve config file (what `serve run`,
`serve deploy` and KubeRay's `serveConfigV2` take). Its application's `args` are
ecoserve's settings, validated here: unknown keys and bad values are rejected
with the key path and the bad value. Environment variables are read only where
a field says so (`auth.feedback_token_env`), once, when the app is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.manifest import describe_validation_error
from serving.auth import Credentials

__all__ = [
    "ConfigError",
    "ResourcesConfig",
    "AutoscalingConfig",
    "GatewayConfig",
    "BatchingConfig",
    "PrimaryPolicyConfig",
    "EpsilonGreedyPolicyConfig",
    "ThompsonPolicyConfig",
    "PolicyConfig",
    "FaultConfig",
    "EcosystemServeConfig",
    "LimitsConfig",
    "AuthConfig",
    "ScopedTokenConfig",
    "TelemetryConfig",
    "ServingConfig",
    "ServeFile",
    "load_serve_file",
    "preflight",
    "port_problem",
    "validation_message",
]

class ConfigError(ValueError):
    """The config is invalid; the message names the key path and the bad value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourcesConfig(_Strict):
    """Ray resources of one replica: fractional values let several replicas share a CPU or GPU."""

    num_cpus: float = Field(default=0.25, ge=0, le=256, description="CPUs reserved per replica")
    num_gpus: float = Field(default=0.0, ge=0, le=16, description="GPUs reserved per replica (fractions share one)")
    num_replicas: int = Field(default=1, ge=1, le=1024, description="replicas of this deployment")


class AutoscalingConfig(_Strict):
    """Ray Serve's autoscaling of the gateway: replicas follow the requests in flight per replica."""

    min_replicas: int = Field(default=1, ge=1, le=1024, description="replicas kept however idle")
    max_replicas: int = Field(default=4, ge=1, le=1024, description="replicas at most")
    target_ongoing_requests: float = Field(
        default=32.0, gt=0, le=100_000, description="requests in flight per replica that the autoscaler aims for")
    upscale_delay_s: float = Field(default=30.0, ge=0, description="load must stay high this long to add a replica")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="load must stay low this long to remove one")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class GatewayConfig(ResourcesConfig):
    """The ingress deployment: fixed `num_replicas`, or `autoscaling` between bounds."""

    num_cpus: float = Field(default=1.0, ge=0, le=256, description="CPUs reserved per replica")
    autoscaling: AutoscalingConfig | None = Field(
        default=None, description="scale the gateway with load (then num_replicas is not used)")

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas


class BatchingConfig(_Strict):
    """Dynamic batching (`@serve.batch`): calls waiting together are run as one batch."""

    max_batch_size: int = Field(default=64, ge=1, le=4096, description="most calls in one batch")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, le=1, description="longest wait to fill a batch (0: take what is queued; under load, calls that arrive while a batch runs form the next one)"
    )


class PrimaryPolicyConfig(_Strict):
    kind: Literal["primary"] = "primary"
    primary: str = Field(description="member whose output is served")


class EpsilonGreedyPolicyConfig(_Strict):
    kind: Literal["epsilon_greedy"] = "epsilon_greedy"
    epsilon: float = Field(default=0.1, gt=0, le=1, description="probability of a uniformly random member")
    prior_alpha: float = Field(default=1.0, gt=0, description="Beta prior successes")
    prior_beta: float = Field(default=1.0, gt=0, description="Beta prior failures")
    seed: int | None = Field(default=None, description="RNG seed (set it for reproducible tests)")


class ThompsonPolicyConfig(_Strict):
    kind: Literal["thompson"] = "thompson"
    prior_alpha: float = Field(default=1.0, gt=0)
    prior_beta: float = Field(default=1.0, gt=0)
    monte_carlo_samples: int = Field(
        default=4096, ge=64, le=1_000_000, description="posterior draws used to compute propensities"
    )
    min_propensity: float = Field(
        default=0.01, ge=0, lt=1, description="floor mixed into every member's propensity (positivity)"
    )
    seed: int | None = None


PolicyConfig = Annotated[
    PrimaryPolicyConfig | EpsilonGreedyPolicyConfig | ThompsonPolicyConfig, Field(discriminator="kind")
]


class FaultConfig(_Strict):
    """Fault injection for one member (testing and game days): raise, or sleep first."""

    error: bool = Field(default=False, description="every call raises")
    delay_s: float = Field(default=0.0, ge=0, le=600, description="sleep this long before answering")


class EcosystemServeConfig(_Strict):
    policy: PolicyConfig | None = Field(
        default=None, description="how the served member is chosen; required unless every member is external")
    members: tuple[str, ...] | None = Field(default=None, description="members to run (default: all current)")
    shadow_fraction: float = Field(
        default=1.0, ge=0, le=1, description="share of requests on which the non-served members also run"
    )
    member_timeout_s: float = Field(default=2.0, gt=0, le=600, description="a member slower than this is missing")
    label_mode: Literal["ground_truth", "bandit"] = Field(default="ground_truth")
    member_resources: dict[str, ResourcesConfig] = Field(
        default_factory=dict, description="per-member resources (placement: per_member)"
    )
    faults: dict[str, FaultConfig] = Field(default_factory=dict, description="fault injection per member")
    assume_label_after_s: float | None = Field(
        default=None, gt=0, description="finalize unlabeled outcomes this old with assumed_label"
    )
    assumed_label: str | float | None = Field(default=None, description="the label assumed after the timeout")
    versions: dict[str, str] = Field(
        default_factory=dict,
        description="member -> the version it serves (default: the last one listed in the manifest); "
        "what `ecoserve rollout promote` and `rollback` write")
    candidates: dict[str, str] = Field(
        default_factory=dict,
        description="member -> a candidate version run in shadow beside it: recorded, never served, "
        "not part of the ecosystem's systemic-failure counts; flips streamed as labels arrive")
    candidate_share: float = Field(
        default=1.0, gt=0, le=1, description="share of the member's requests its candidate also runs on")
    position_shuffle_rate: float = Field(
        default=0.0, ge=0, le=1, description="ranking: share of rows whose shown list is shuffled uniformly "
        "(position exploration); each shown item's slot propensity is recorded")

    @model_validator(mode="after")
    def _assumed_pair(self) -> EcosystemServeConfig:
        if (self.assume_label_after_s is None) != (self.assumed_label is None):
            raise ValueError("assume_label_after_s and assumed_label go together")
        return self


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1 << 31, description="413 above this")
    max_rows_per_request: int = Field(default=4096, ge=1, le=1_000_000, description="413 above this")


class ScopedTokenConfig(_Strict):
    """A bearer token that may post labels and outcomes for some ecosystems only."""

    env: str = Field(description="environment variable holding the token")
    ecosystems: list[str] = Field(min_length=1, description="the served ecosystems this token covers")


class AuthConfig(_Strict):
    """Bearer tokens (docs/security.md). Each is read from an environment variable once, when the
    app is built; none is ever written to the app's args, a log or a metric."""

    feedback_token_env: str | None = Field(
        default=None,
        description="environment variable holding the token of the feedback and outcomes APIs (every ecosystem)",
    )
    ecosystem_tokens: list[ScopedTokenConfig] = Field(
        default_factory=list, description="tokens covering some ecosystems only (labels, outcomes)"
    )
    inference_token_env: str | None = Field(
        default=None, description="environment variable holding a token the inference routes require (default: open)"
    )

    def token_envs(self) -> list[str]:
        """Every environment variable this section names."""
        envs = [self.feedback_token_env, self.inference_token_env, *(t.env for t in self.ecosystem_tokens)]
        return [e for e in envs if e]

    def feedback_token(self) -> str | None:
        """The all-ecosystems token, read from the environment (None: none configured)."""
        return None if self.feedback_token_env is None else _token(self.feedback_token_env, "feedback_token_env")

    def credentials(self) -> Credentials:
        """Every token, read from the environment once when the app is built."""
        scoped = tuple(
            (_token(t.env, f"ecosystem_tokens[{i}].env"), frozenset(t.ecosystems))
            for i, t in enumerate(self.ecosystem_tokens)
        )
        inference = None if self.inference_token_env is None else _token(self.inference_token_env,
                                                                         "inference_token_env")
        creds = Credentials(self.feedback_token(), scoped, inference)
        values = [v for v in (creds.feedback, *(t for t, _ in scoped)) if v is not None]
        if len(set(values)) != len(values):
            raise ConfigError("auth: two label tokens have the same value; each token needs its own secret")
        return creds


def _token(env: str, fieldname: str) -> str:
    token = os.environ.get(env, "")
    if not token:
        raise ConfigError(f"auth.{fieldname}: environment variable {env!r} is empty or unset")
    return token


class EstimationConfig(_Strict):
    """Label-free estimates of failure for outcomes still waiting for labels (docs/design.md)."""

    enabled: bool = Field(default=True, description="fit an estimator on labeled outcomes and stream its estimates")
    interval_s: float = Field(default=30.0, gt=0, description="how often the estimates are refreshed")
    refit_interval_s: float = Field(default=600.0, gt=0, description="how often the estimator is refitted")
    reference_size: int = Field(default=20_000, ge=200, le=1_000_000,
                                description="newest labeled outcomes it is fitted on")
    max_estimated: int = Field(default=20_000, ge=1, le=1_000_000,
                               description="newest outcomes of the window waiting for labels that are estimated")


class TelemetryConfig(_Strict):
    """Outcome recording, the label join, and /metrics (docs/store.md, docs/configuration.md)."""

    enabled: bool = Field(default=True, description="record outcomes, accept feedback, serve /metrics")
    store_url: str = Field(
        default="sqlite:///ecoserve-outcomes.db",
        description="outcome store: sqlite:///PATH (relative to the working dir) or postgresql://...",
    )
    store_url_env: str | None = Field(
        default=None, description="environment variable holding the store URL (overrides store_url; for Secrets)"
    )
    flush_interval_s: float = Field(default=0.25, gt=0, le=60, description="gateway -> recorder hand-over period")
    max_queue: int = Field(default=100_000, ge=100, le=10_000_000, description="records a gateway holds before dropping")
    max_batch: int = Field(default=5000, ge=1, le=100_000, description="records per hand-over")
    max_feedback_items: int = Field(default=10_000, ge=1, le=1_000_000, description="labels per feedback request")
    pending_ttl_s: float = Field(default=3600.0, gt=0, description="how long a label waits for its outcome")
    max_pending: int = Field(default=100_000, ge=1, description="labels waiting for outcomes, at most")
    window_s: float = Field(default=3600.0, gt=0, description="rolling window of the ecoserve_window_* gauges")
    window_buckets: int = Field(default=12, ge=1, le=1440, description="buckets the window slides by")
    estimation: EstimationConfig = Field(default_factory=EstimationConfig)
    score_vector_max_classes: int = Field(
        default=0, ge=0, le=100,
        description="also record each member's full score vector (every class's score, 4 significant digits) "
        "for classification ecosystems of at most this many classes; 0: only the score of the predicted class",
    )
    sweep_interval_s: float = Field(default=5.0, gt=0, description="assumed-label and pending-expiry sweep period")
    coverage_ages_s: tuple[float, ...] = Field(
        default=(60.0, 600.0, 3600.0, 86400.0, 604800.0), min_length=1,
        description="prediction ages of ecoserve_label_coverage_ratio",
    )
    ledger_dir: str | None = Field(
        default=None,
        description="where gateways keep their crash ledgers (telemetry.ledger); default: "
        "TMPDIR/ecoserve-ledgers/STORE_KEY. Use a volume that outlives the container",
    )
    recorder_process: bool = Field(
        default=True,
        description="with the recorder in the gateway: run it in a child process of the gateway "
        "(serving.recording.process), so that its counting and store writes do not hold the gateway's GIL",
    )
    recorder_process_nice: int = Field(
        default=10, ge=0, le=19,
        description="CPU niceness added to that child (0-19): above 0, serving wins the CPU when it is "
        "contended, and hand-overs wait in the gateway's bounded queue meanwhile",
    )
    recorder: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_cpus=0.25))
    recorder_in_gateway: bool | None = Field(
        default=None,
        description="run the recorder inside the gateway process instead of as its own deployment; "
        "default: inside when there is one gateway replica (measured faster), a deployment otherwise",
    )

    def store_key(self) -> str:
        """A stable name for the store, the same in every process (no password in it)."""
        from telemetry.ledger import store_key

        return store_key(self.store_url, self.store_url_env)

    def resolved_ledger_dir(self) -> Path:
        from telemetry.ledger import default_ledger_dir

        return Path(self.ledger_dir) / self.store_key() if self.ledger_dir else default_ledger_dir(self.store_key())

    def resolved_store_url(self) -> str:
        if self.store_url_env:
            url = os.environ.get(self.store_url_env, "")
            if not url:
                raise ConfigError(f"telemetry.store_url_env: environment variable {self.store_url_env!r} is empty or unset")
            return url
        if self.store_url.startswith("sqlite:///") and not self.store_url.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(self.store_url.removeprefix("sqlite:///")).resolve())
        return self.store_url


class ServingConfig(_Strict):
    """The `args` of the ecoserve application."""

    model_repository: str = Field(description="model repository folder (absolute, or relative to the working dir)")
    ecosystems: dict[str, EcosystemServeConfig] = Field(min_length=1)
    provider: Literal["auto", "cuda", "cpu"] = "auto"
    placement: Literal["colocated", "per_member"] = Field(
        default="colocated",
        description="colocated: every member in the gateway replica; per_member: one deployment per member",
    )
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    members: ResourcesConfig = Field(default_factory=ResourcesConfig, description="default per-member resources")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    def recorder_in_gateway(self) -> bool:
        """Where the recorder runs (one writer per store: in the gateway only with one replica)."""
        choice = self.telemetry.recorder_in_gateway
        return self.gateway.max_replicas == 1 if choice is None else choice

    @model_validator(mode="after")
    def _one_writer(self) -> ServingConfig:
        if self.telemetry.recorder_in_gateway and self.gateway.max_replicas != 1:
            raise ValueError("telemetry.recorder_in_gateway needs one gateway replica (num_replicas: 1, no "
                             "autoscaling above 1): one writer per store")
        return self

    @model_validator(mode="after")
    def _policies_name_members(self) -> ServingConfig:
        for name, eco in self.ecosystems.items():
            members = set(eco.members or ())
            policy = eco.policy
            if policy is not None and isinstance(policy, PrimaryPolicyConfig) and eco.members and policy.primary not in members:
                raise ValueError(f"ecosystems.{name}.policy.primary: {policy.primary!r} is not in members")
        return self

    @model_validator(mode="after")
    def _tokens_name_ecosystems(self) -> ServingConfig:
        for i, t in enumerate(self.auth.ecosystem_tokens):
            unknown = sorted(set(t.ecosystems) - set(self.ecosystems))
            if unknown:
                raise ValueError(f"auth.ecosystem_tokens[{i}].ecosystems: {unknown[0]!r} is not a served ecosystem")
        return self


class ServeFile(BaseModel):
    """A Ray Serve config file; only the ecoserve application's `args` are ecoserve's to validate."""

    model_config = ConfigDict(extra="allow")

    raw: dict[str, Any]
    app_index: int
    serving: ServingConfig

    @property
    def http_host(self) -> str:
        return str(self.raw.get("http_options", {}).get("host", "127.0.0.1"))

    @property
    def http_port(self) -> int:
        return int(self.raw.get("http_options", {}).get("port", 8000))

    @property
    def grpc_port(self) -> int | None:
        """The gRPC port when the file turns Serve's gRPC ingress on (`grpc_options`), else None."""
        grpc = self.raw.get("grpc_options") or {}
        return int(grpc.get("port", 9000)) if grpc.get("grpc_servicer_functions") else None


def validation_message(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: `key.path: message (got VALUE)`."""
    return "\n".join(describe_validation_error(err, prefix))


def parse_serving(args: Any, prefix: str = "args") -> ServingConfig:
    try:
        return ServingConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix)) from exc


def load_serve_file(path: str | Path) -> ServeFile:
    """Read a Serve config file and validate the ecoserve application's args."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: no such config file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("applications"), list) or not raw["applications"]:
        raise ConfigError(f"{p}: applications: a Serve config needs a non-empty 'applications' list")
    for i, app in enumerate(raw["applications"]):
        if isinstance(app, dict) and str(app.get("import_path", "")).startswith("serving.app:"):
            serving = parse_serving(app.get("args") or {}, prefix=f"applications.{i}.args")
            return ServeFile(raw=raw, app_index=i, serving=serving)
    raise ConfigError(f"{p}: applications: no application with import_path 'serving.app:build_app'")


def port_problem(host: str, port: int) -> str | None:
    """What stops a server listening on host:port (None: it is free)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to serve on
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another ecoserve, Ray Serve or haproxy?)"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def preflight(file: ServeFile, *, check_port: bool = True, check_env: bool = True) -> None:
    """Everything the app will need from its environment, checked before Ray starts (a failure
    there surfaces only after ~30 s, as a Ray traceback, with the cause in the controller's log):
    the feedback token and store URL variables, the store URL's form, the model repository with
    each ecosystem's manifest, members and model files, and the HTTP port. Raises `ConfigError`
    naming the first setting that cannot work. `check_env=False` skips what depends on the
    serving machine's environment (token and store variables, the store's folder): what
    `ecoserve rollout` checks when it rewrites a config that runs elsewhere."""
    s = file.serving
    if check_env:
        s.auth.credentials()  # every token variable is set, non-empty, and each token distinct
    if s.telemetry.enabled and check_env:
        url = s.telemetry.resolved_store_url()
        key = "telemetry.store_url_env" if s.telemetry.store_url_env else "telemetry.store_url"
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ConfigError(f"{key}: expected sqlite:///PATH or postgresql://..., got a URL starting "
                              f"{url.split(':', 1)[0]!r}")
        if url.startswith("sqlite:///") and ":memory:" not in url:
            folder = Path(url.removeprefix("sqlite:///")).parent
            while not folder.exists():  # the store creates missing folders: the nearest existing one must be writable
                folder = folder.parent
            if not os.access(folder, os.W_OK):
                raise ConfigError(f"{key}: the folder {folder} is not writable")
    repo = Path(s.model_repository)
    if not repo.is_dir():
        raise ConfigError(f"model_repository: no such folder {str(repo)!r} (build the demo models with "
                          "`ecoserve build-models`, or point it at your repository)")
    from models.manifest import ManifestError, load_manifest

    for name, eco in s.ecosystems.items():
        try:
            manifest = load_manifest(repo / name)
        except ManifestError as exc:
            raise ConfigError(f"ecosystems.{name}: {str(exc).splitlines()[0]}") from exc
        for member, version in {**eco.versions, **eco.candidates}.items():
            field = "versions" if member in eco.versions and eco.versions[member] == version else "candidates"
            if version not in manifest.versions_of(member):
                known = manifest.versions_of(member)
                raise ConfigError(f"ecosystems.{name}.{field}.{member}: " + (
                    f"no version {version!r} (the manifest lists {', '.join(map(repr, known))})" if known
                    else f"{member!r} is not a member of {repo / name}"))
        current = {m.name: m for m in manifest.served_members(eco.versions)}
        if eco.position_shuffle_rate and manifest.task != "ranking":
            raise ConfigError(f"ecosystems.{name}.position_shuffle_rate: for ranking ecosystems only (this one is "
                              f"{manifest.task})")
        for member, version in eco.candidates.items():
            if member not in (eco.members or list(current)):
                raise ConfigError(f"ecosystems.{name}.candidates.{member}: the member is not run here")
            if version == current[member].version:
                raise ConfigError(f"ecosystems.{name}.candidates.{member}: version {version!r} is the one it "
                                  "serves already")
            cand = manifest.member(member, version)
            if not cand.local or not current[member].local:
                raise ConfigError(f"ecosystems.{name}.candidates.{member}: candidates are ONNX members (or "
                                  "pipelines) of this repository (not remote or external)")
            for rel in cand.model_paths:
                if not (repo / name / rel).is_file():
                    raise ConfigError(f"ecosystems.{name}.candidates.{member}: no model file {repo / name / rel}")
        served = [m for m in eco.members or list(current) if m in current and current[m].kind != "external"]
        if served and eco.policy is None:
            raise ConfigError(f"ecosystems.{name}.policy: required (members {', '.join(served)} are served here)")
        for member in eco.members or list(current):
            if member not in current:
                raise ConfigError(f"ecosystems.{name}.members: {member!r} is not a member of {repo / name} "
                                  f"({', '.join(current)})")
            spec = current[member]
            if spec.kind == "external":
                continue
            if spec.remote is not None:
                if check_env and spec.remote.token_env and not os.environ.get(spec.remote.token_env):
                    raise ConfigError(f"ecosystems.{name}: member {member!r}: environment variable "
                                      f"{spec.remote.token_env!r} (its remote.token_env) is empty or unset")
                continue
            for rel in spec.model_paths:
                if not (repo / name / rel).is_file():
                    raise ConfigError(f"ecosystems.{name}: member {member!r}: no model file {repo / name / rel}")
    if check_port:
        problem = port_problem(file.http_host, file.http_port)
        if problem is not None:
            raise ConfigError(f"http_options.port: {problem}")
        if file.grpc_port is not None:
            problem = port_problem("0.0.0.0", file.grpc_port)
            if problem is not None:
                raise ConfigError(f"grpc_options.port: {problem}")
