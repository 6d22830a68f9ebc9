"""Shared fixtures: a demo model repository built once per test session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both demo ecosystems, built fresh into a temporary repository (about 5 s)."""
    from models.build import build_models

    repo = tmp_path_factory.mktemp("repo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_models(repo)
    return repo
