"""Shared fixtures: the real SmolLM2 weights (loaded once per session) and tiny models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCHS = ("gpt2", "llama", "opt", "neox")


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    from routescope.workers.checkpoint import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_checkpoint):
    """One in-process SmolLM2 pipeline for the whole session (shared through routescope.load)."""
    import routescope

    return routescope.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny random models of every covered architecture, saved as HF directories."""
    from routescope.workers.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in TINY_ARCHS}
