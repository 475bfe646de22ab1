"""Shared fixtures: one tiny model per test session (and, in later stages, one Ray instance)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Keep every vLLM engine small: the KV cache lives in CPU memory here.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from rayalign.models import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")
