"""The vLLM engine tests' skip guard."""

from __future__ import annotations

import importlib.util

import pytest


def require_vllm() -> None:
    """Skip the calling module only when vLLM is absent; an installed but broken vLLM must fail the
    tests, not vanish as a skip."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed; install the vllm extra (see the Makefile) to run these tests",
                    allow_module_level=True)
    import vllm  # noqa: F401
