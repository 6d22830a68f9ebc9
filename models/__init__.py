"""Demo ecosystems, the model repository manifest, and ONNX Runtime sessions.

Never imports `serving`, `telemetry` or Ray.
"""

from models.manifest import EcosystemManifest, ManifestError, MemberSpec, TensorSpec, list_ecosystems, load_manifest
from models.runtime import InputError, MemberSession, ProviderError, load_member, resolve_providers, validate_input

__all__ = [
    "EcosystemManifest",
    "InputError",
    "ManifestError",
    "MemberSession",
    "MemberSpec",
    "ProviderError",
    "TensorSpec",
    "list_ecosystems",
    "load_manifest",
    "load_member",
    "resolve_providers",
    "validate_input",
]
