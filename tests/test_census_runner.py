"""The census runner (seqwrap/hf/census.py): a family that hangs or cannot be looked up is recorded, not fatal."""
import pytest

pytest.importorskip("transformers")

from seqwrap.hf.census import offenders, run_census  # noqa: E402
from seqwrap.hf.census_table import markdown  # noqa: E402


def test_a_family_past_its_timeout_is_killed_and_recorded_as_an_error():
    [record] = run_census(["llama"], workers=1, timeout=0.01)
    assert record["seco"]["status"] == "error" and "timed out" in record["seco"]["message"]
    assert offenders([record]) == [("llama", "seco", "error"), ("llama", "mst", "error")]


def test_unknown_family_cannot_build_and_the_next_family_still_runs():
    records = run_census(["no_such_family", "gpt2"], workers=1, timeout=120)
    assert [r["family"] for r in records] == ["no_such_family", "gpt2"]
    assert records[0]["seco"]["status"] == "cannot-build"
    assert records[1]["seco"]["status"] == "exact" and records[1]["mst"]["status"] == "refused"
    text = markdown(records, full=False, versions="test")
    assert "| gpt2 | decoder | exact | refused |" in text and "| exact | 1 | 0 | 0 |" in text
