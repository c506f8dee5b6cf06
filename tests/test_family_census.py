"""The family census: every causal-LM family of the installed transformers through seqwrap.verify.

Fails on any family whose SeCO or MsT step is wrong or errors mid-step, unless tests/census_expected.py
lists it as a known offender (and on a listed offender that is fixed: remove it from the list), and on
a family whose twin starts or stops building. docs/support.md must be what the census generates.

    pytest -m census tests/test_family_census.py                       # the whole census (~1 min on 2 cores)
    SEQWRAP_CENSUS_FAMILIES=llama,phi3 pytest -m census tests/...      # a subset while developing
"""
import difflib
import os
import pathlib
import re

import pytest

pytest.importorskip("transformers")

from seqwrap.hf.census import offenders, run_census  # noqa: E402
from seqwrap.hf.census_table import markdown  # noqa: E402

import transformers  # noqa: E402

from .census_expected import CANNOT_BUILD, OFFENDERS_AT  # noqa: E402
from .census_expected import OFFENDERS as _OFFENDERS  # noqa: E402

OFFENDERS = {**_OFFENDERS, **OFFENDERS_AT.get(transformers.__version__, {})}

pytestmark = pytest.mark.census
ROOT = pathlib.Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "docs" / "support.md"


@pytest.fixture(scope="module")
def census():
    subset = os.environ.get("SEQWRAP_CENSUS_FAMILIES")
    names = [n.strip() for n in subset.split(",") if n.strip()] if subset else None
    (ROOT / "build" / "census").mkdir(parents=True, exist_ok=True)
    records = run_census(names, workers=int(os.environ.get("SEQWRAP_CENSUS_WORKERS", "2")), timeout=120,
                         log_path=str(ROOT / "build" / "census" / "workers.log"))
    return names, records


def _row(r, engine):
    x = r[engine]
    if x["status"] == "wrong":
        what = f"worst {x.get('worst_error'):.1e} in {x.get('worst_group')} ({x.get('worst_param')}), loss " \
               f"{x.get('loss_error') or 0:.1e}"
    else:
        what = f"{x.get('exception')}: {(x.get('message') or '')[:240]} at {x.get('where', '')}"
    return f"  {r['family']:<26} {engine:<12} {x['status']:<6} {what}"


def test_census_ran_every_family_and_the_reference_families_are_exact(census):
    names, records = census
    assert records and (names is None or len(records) == len(names))
    by = {r["family"]: r for r in records}
    broken = [r["family"] for r in records if "census_error" in r]
    assert not broken, f"the census itself failed for {broken}"
    for family in ("llama", "mistral", "qwen2", "phi3"):  # the check is not vacuous: these must be exact
        if family in by:
            assert by[family]["seco"]["status"] == "exact", _row(by[family], "seco")
            assert by[family]["mst"]["status"] == "exact", _row(by[family], "mst")
    if names is None:
        assert len([r for r in records if r["seco"]["status"] == "exact"]) >= 80


def test_no_family_is_wrong_or_fails_mid_step_beyond_the_known_offenders(census):
    names, records = census
    by = {r["family"]: r for r in records}
    found = {(f, e): s for f, e, s in offenders(records)}
    new = [(f, e) for (f, e), s in found.items() if OFFENDERS.get((f, e), (None,))[0] != s]
    fixed = [(f, e) for (f, e) in OFFENDERS if f in by and (f, e) not in found]
    lines = []
    if new:
        lines.append("wrong gradients or mid-step failures not listed in tests/census_expected.py:")
        lines += [_row(by[f], e) for f, e in sorted(new)]
    if fixed:
        lines.append("listed offenders that are no longer wrong/error (remove them from tests/census_expected.py):")
        lines += [f"  {f:<26} {e:<12} now {by[f][e]['status'] if e in by[f] else 'not run'}" for f, e in fixed]
    assert not lines, "\n".join(lines)


def test_the_same_families_build_as_before(census):
    names, records = census
    now = {r["family"] for r in records if r["seco"]["status"] == "cannot-build"}
    ran = {r["family"] for r in records}
    expected = {f for f in CANNOT_BUILD if f in ran}
    msg = []
    if now - expected:
        msg.append("twins that no longer build (a tiny.py regression, or a new family needing an override):")
        msg += [f"  {r['family']}: {r['seco'].get('message')}" for r in records if r["family"] in now - expected]
    if expected - now:
        msg.append(f"families that build now (remove them from CANNOT_BUILD): {sorted(expected - now)}")
    assert not msg, "\n".join(msg)


def test_docs_support_md_is_what_the_census_generates(census):
    names, records = census
    if names is not None:
        pytest.skip("SEQWRAP_CENSUS_FAMILIES selects a subset; docs/support.md covers every family")
    old = SUPPORT.read_text() if SUPPORT.exists() else ""
    recorded = re.search(r"\((transformers [^,]+, torch [^)]+)\)", old)
    text = markdown(records)
    installed = re.search(r"\((transformers [^,]+, torch [^)]+)\)", text).group(1)
    if recorded and recorded.group(1) != installed:
        pytest.skip(f"docs/support.md records {recorded.group(1)}; this run has {installed} (a matrix column)")
    fresh = ROOT / "build" / "census" / "support.md"
    fresh.write_text(text)
    diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), "docs/support.md",
                                        "census now", n=0))
    assert old == text, (f"docs/support.md is out of date; regenerate with `python -m seqwrap.hf.census --write "
                         f"docs/support.md` (this run's version: {fresh}):\n{diff[:6000]}")

