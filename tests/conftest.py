"""Shared fixtures: a small study (smoke parameters, shrunk further) built once per session in a temp cache."""
from __future__ import annotations

import pytest
import torch

import forgetlab
from forgetlab.cache import ArtifactCache
from forgetlab.config import load_params

torch.set_num_threads(max(1, torch.get_num_threads()))
forgetlab.determinism()


@pytest.fixture(scope="session")
def small_params() -> dict:
    return load_params("smoke", {"max_train_tokens": 20000, "vocab_size": 400, "population_size": 8,
                                 "background_size": 4, "forget_size": 3, "control_size": 2, "epochs": 0.5,
                                 "reference_seeds": [1], "original_seeds": [0]})


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> ArtifactCache:
    return ArtifactCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def small_data(small_params, session_cache):
    from forgetlab.experiment import get_study_data
    return get_study_data(small_params, session_cache)
