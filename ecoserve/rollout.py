"""`ecoserve rollout promote|rollback`: change the version a member serves, through Serve's own
redeploy of the running app.

The config file is the one source of truth: the command rewrites the ecosystem's `versions`
(and `candidates`) in it, keeping its comments and layout (ruamel.yaml's round trip), after
checking the result as `ecoserve check-config` would. Then:

- a server started with `ecoserve serve CONFIG` watches that file and redeploys the app with
  `serve.run` when it changes (`ecoserve.server.ConfigWatcher`); Serve replaces the gateway
  replicas, each old one handing its queued outcome records to the recorder before it stops (its
  graceful shutdown), so no outcome is lost. With `--url`, the command waits until the server's
  metadata shows the new version;
- in Kubernetes, `--k8s` regenerates the RayService (`ecoserve k8s generate`): `kubectl apply` it
  and KubeRay applies the new serveConfigV2 to the running cluster in place.

`promote ECOSYSTEM MEMBER VERSION` serves VERSION; the version served until then stays in shadow
as the member's candidate (its flips, measured the other way round, say what the promotion
changed; `rollback` is then instant), unless `--no-shadow`. `rollback ECOSYSTEM MEMBER` serves the
version in shadow again (or `--to VERSION`), with the same rule for the one it replaces.
Every outcome records the versions that produced it (`ecoserve_outcomes_v.versions`), so what was
recorded before and after the switch is never mixed up.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import httpx

from serving.config import ConfigError, load_serve_file, preflight

__all__ = ["RolloutError", "rollout", "wait_for_version"]


class RolloutError(ValueError):
    """The rollout cannot be done; one line saying why."""


def _yaml(text: str) -> Any:
    from ruamel.yaml import YAML

    y = YAML()  # round trip: comments, order and quoting stay as they are
    y.preserve_quotes = True
    y.width = 4096
    # keep the file's list indentation ("key:\n  - item" or "key:\n- item"): ruamel writes
    # one style for the whole file, and a comment keeps its column
    lines = text.splitlines()
    for above, line in zip(lines, lines[1:]):
        item = re.match(r"^( *)- ", line)
        key = re.match(r"^( *)[^ #-][^:]*:\s*$", above)
        if item and key:
            offset = len(item.group(1)) - len(key.group(1))
            y.indent(mapping=2, sequence=offset + 2, offset=offset)
            break
    return y


def rollout(config: str | Path, action: str, ecosystem: str, member: str, version: str | None = None,
            shadow_previous: bool = True) -> tuple[str, str]:
    """Rewrite `config` for the rollout; returns (previous version, new version)."""
    path = Path(config)
    file = load_serve_file(path)  # the file as it is must be valid (one line if not)
    text = path.read_text()
    y = _yaml(text)
    doc = y.load(text)
    args = doc["applications"][file.app_index].setdefault("args", {})
    ecos = args.get("ecosystems") or {}
    if ecosystem not in ecos:
        raise RolloutError(f"{path}: no ecosystem {ecosystem!r} in the config ({', '.join(ecos) or 'none'})")
    eco = ecos[ecosystem]
    from models.manifest import load_manifest

    manifest = load_manifest(Path(file.serving.model_repository) / ecosystem)
    eco_cfg = file.serving.ecosystems[ecosystem]
    served = {m.name: m.version for m in manifest.served_members(eco_cfg.versions)}
    if member not in served:
        raise RolloutError(f"{ecosystem}: no member {member!r} ({', '.join(served)})")
    previous = served[member]
    in_shadow = eco_cfg.candidates.get(member)
    if action == "rollback" and version is None:
        if in_shadow is None:
            raise RolloutError(f"{ecosystem}.{member}: no version in shadow to roll back to; give --to VERSION")
        version = in_shadow
    assert version is not None
    if version not in manifest.versions_of(member):
        raise RolloutError(f"{ecosystem}.{member}: no version {version!r} in the repository "
                           f"({', '.join(manifest.versions_of(member))})")
    if version == previous:
        raise RolloutError(f"{ecosystem}.{member}: version {version!r} is the one it serves already")
    eco.setdefault("versions", {})[member] = version
    candidates = eco.get("candidates")
    if shadow_previous:
        if candidates is None:
            eco["candidates"] = candidates = {}
        candidates[member] = previous
    elif candidates is not None and member in candidates:
        del candidates[member]
        if not candidates:
            del eco["candidates"]
    buf = io.StringIO()
    y.dump(doc, buf)
    tmp = path.with_name(f".{path.name}.rollout")
    tmp.write_text(buf.getvalue())
    try:  # what `ecoserve check-config --skip-port` checks, before the file is replaced (not the
        # serving machine's environment: its token and store variables need not be set here)
        preflight(load_serve_file(tmp), check_port=False, check_env=False)
    except ConfigError as exc:
        tmp.unlink()
        raise RolloutError(f"the rewritten config would not be valid: {exc}") from exc
    tmp.chmod(path.stat().st_mode & 0o7777)  # the file keeps its permissions
    tmp.replace(path)  # atomic: a watching server never reads half a file
    return previous, version


def wait_for_version(url: str, ecosystem: str, member: str, version: str, timeout_s: float = 120.0) -> float:
    """Seconds until `GET /v2/models/ECOSYSTEM` says MEMBER serves VERSION."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        try:
            r = httpx.get(f"{url}/v2/models/{ecosystem}", timeout=5)
            if r.status_code == 200:
                members = {m["name"]: m["version"] for m in r.json()["parameters"]["members"]}
                last = members.get(member, "")
                if last == version:
                    return time.monotonic() - t0
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise RolloutError(f"{url}: {ecosystem}.{member} still serves version {last or '?'} after {timeout_s:.0f} s "
                       "(is the server running with this config file? `ecoserve serve CONFIG` watches it)")
