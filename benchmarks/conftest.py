"""Benchmarks are run with `pytest benchmarks/ -s` (make bench); they write under benchmarks/results/."""
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent / "results"


@pytest.fixture
def results_dir():
    RESULTS.mkdir(exist_ok=True)
    return RESULTS
