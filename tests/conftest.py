"""Test-suite wiring: tests marked `cuda` need a CUDA device and are skipped without one
(benchmarks/gpu_check.sh runs them on a GPU machine with `-m cuda`)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
