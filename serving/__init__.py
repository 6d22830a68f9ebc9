"""The serving layer: the Ray Serve application, the Open Inference Protocol, routing.

Importing this package does not import Ray; `serving.app` (the Serve application) does.
`serving` may import `telemetry` and `models`, never the other way round.
"""

from serving.config import ConfigError, ServingConfig, load_serve_file, parse_serving
from serving.errors import (
    BadRequest,
    EcoserveError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    UnprocessableEntity,
)

__all__ = [
    "BadRequest",
    "ConfigError",
    "EcoserveError",
    "NotFound",
    "PayloadTooLarge",
    "ServingConfig",
    "Unauthorized",
    "Unavailable",
    "UnprocessableEntity",
    "load_serve_file",
    "parse_serving",
]
