"""The declared version range: what is installed, the check, the escape hatch."""
import warnings

import pytest

from seqwrap.hf import versions


@pytest.mark.parametrize("package", sorted(versions.SUPPORTED))
def test_installed_versions_are_in_the_supported_range(package):
    """Fails (by name) when the suite runs on a release outside the declared range, e.g. in
    `make test-latest` after a new release: test it, then move the range (README, Versions)."""
    version = versions.installed(package)
    if version is None:
        pytest.skip(f"{package} is not installed")
    floor, ceiling = versions.SUPPORTED[package]
    assert versions.in_range(package, version), f"{package} {version} is outside [{floor}, {ceiling})"


def test_parse_and_compare():
    assert versions.parse_version("5.24.0") == (5, 24, 0)
    assert versions.parse_version("5.25.0.dev0") == (5, 25, 0)
    assert versions.parse_version("1.2rc1") == (1, 2)
    floor, ceiling = versions.SUPPORTED["transformers"]
    assert versions.in_range("transformers", floor)
    assert not versions.in_range("transformers", ceiling)
    assert not versions.in_range("transformers", "4.57.6")


def test_outside_the_range_raises_naming_version_and_range(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda package: "99.0.0")
    monkeypatch.setattr(versions, "_checked", set())
    monkeypatch.delenv(versions.ENV_ALLOW, raising=False)
    floor, ceiling = versions.SUPPORTED["transformers"]
    with pytest.raises(versions.UnsupportedVersionError, match=rf"transformers 99\.0\.0 .*>= {floor}, < {ceiling}"):
        versions.check_version("transformers", "seqwrap.SeCO")
    monkeypatch.setenv(versions.ENV_ALLOW, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.check_version("transformers", "seqwrap.SeCO")
    (w,) = caught
    # the variable is already set: the warning says so instead of telling the user to set it
    assert "is set" in str(w.message) and "own risk" not in str(w.message) and "transformers 99.0.0" in str(w.message)
    assert w.filename == __file__  # points at the caller's line, not at seqwrap's


def test_warnings_point_at_the_users_line(monkeypatch):
    """Raised deep inside an engine step, the concat-switch warning still names the user's call."""
    pytest.importorskip("transformers")
    import seqwrap
    from tests.exact_families import batch, build

    model = build("diffllama")
    ids, _ = batch(T=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqwrap.SeCO(model, chunk_size=6)(ids)
    switch = [w for w in caught if "attention='concat'" in str(w.message)]
    assert len(switch) == 1 and switch[0].filename == __file__


def test_engines_check_the_version(monkeypatch):
    pytest.importorskip("transformers")
    import seqwrap
    from tests.hf_tiny import tiny_model

    monkeypatch.setattr(versions, "installed", lambda package: "4.46.0")
    monkeypatch.setattr(versions, "_checked", set())
    monkeypatch.delenv(versions.ENV_ALLOW, raising=False)
    model = tiny_model("llama")
    for apply in (lambda: seqwrap.SeCO(model, 4), lambda: seqwrap.apply_minisequence(model)):
        with pytest.raises(seqwrap.UnsupportedVersionError, match="transformers 4.46.0"):
            apply()
    assert not seqwrap.hf.is_minisequence_applied(model)


def _newer_transformers(monkeypatch):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda package: "99.0.0" if package == "transformers" else real(package))
    monkeypatch.setattr(versions, "_checked", set())
    monkeypatch.setattr(versions, "_verified", {})
    monkeypatch.delenv(versions.ENV_ALLOW, raising=False)


def test_a_newer_transformers_is_verified_once_per_config(monkeypatch):
    """Past the ceiling, wrapping runs seqwrap.verify on the architecture once per config: exact goes on with a
    warning naming the version."""
    pytest.importorskip("transformers")
    import importlib

    import seqwrap
    from tests.hf_tiny import tiny_model

    verify_mod = importlib.import_module("seqwrap.hf.verify")  # (seqwrap.hf.verify is the function)

    _newer_transformers(monkeypatch)
    calls = []
    real_verify = verify_mod.verify
    monkeypatch.setattr(verify_mod, "verify", lambda *a, **k: calls.append(k) or real_verify(*a, **k))
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"transformers 99\.0\.0 is newer.*seqwrap\.verify.*exact"):
        seqwrap.SeCO(model, 4)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        seqwrap.SeCO(model, 6)  # same config: the report is reused, and the warning is not repeated
    assert not [w for w in again if "is newer" in str(w.message)]
    assert len(calls) == 1 and calls[0]["engine"] == "seco"


def test_a_newer_transformers_that_breaks_exactness_is_refused_with_the_report(monkeypatch):
    pytest.importorskip("transformers")
    import seqwrap
    from seqwrap.engines import kv_store
    from tests.hf_tiny import tiny_model

    _newer_transformers(monkeypatch)
    # stands for a release that breaks what chunking relies on: the relayed K/V gradients vanish
    monkeypatch.setattr(kv_store.ChunkKVStore, "relay_pairs", lambda self, chunk: [])
    model = tiny_model("llama")
    with pytest.raises(seqwrap.UnsupportedVersionError, match=r"(?s)99\.0\.0 is newer.*did not come out exact.*WRONG"):
        seqwrap.SeCO(model, 4)
    assert all(p.grad is None for p in model.parameters())
