"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def poisoned_uninitialized_memory():
    """Deterministic mode, which fills every ``empty`` tensor (a kernel's outputs and buffers included) with NaN, so
    that an element a kernel forgets to write shows up as NaN."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL (weights, processor, chat template), built offline once per test session; without
    the warm start, which tests/test_sft.py covers, to keep the session fast."""
    from ekipl.tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0, warm_start_steps=0)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    """The tiny model's processor (PIL image processor, no torchvision)."""
    from ekipl.models import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """A fresh copy of the tiny policy per test module (modules may change its weights)."""
    from ekipl.models import load_policy

    return load_policy(tiny_model_dir)
