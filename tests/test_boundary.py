"""The HF boundary: transformers internals stay in seqwrap/hf/, engines/ops/parallel import no transformers,
and a SeCO step and an MsT step run clean of deprecation warnings on the installed transformers."""
import ast
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

PKG = pathlib.Path(__file__).resolve().parents[1] / "seqwrap"


def _imports(path):
    """(module, names) of every import statement in a file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]


def test_no_private_transformers_name_outside_hf():
    """Outside seqwrap/hf/: no import of a private transformers module or name (a component starting
    with '_'), and none of the private attributes the boundary handles."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.parent.name == "hf":
            continue
        for module, names in _imports(path):
            parts = module.split(".")
            if parts[0] == "transformers" and any(p.startswith("_") for p in parts + names):
                offenders.append(f"{path.relative_to(PKG)}: imports {module} {names}")
        text = path.read_text()
        for attr in ("_attn_implementation", "_can_checkpoint_with_cache", "_gradient_checkpointing_func",
                     "_prepare_inputs", "past_key_values", "loss_utils", "masking_utils", "cache_utils"):
            if attr in text:
                offenders.append(f"{path.relative_to(PKG)}: names {attr}")
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["engines", "ops", "parallel"])
def test_package_imports_no_transformers_module(package):
    for path in (PKG / package).rglob("*.py"):
        for module, _ in _imports(path):
            assert module.split(".")[0] != "transformers", f"{path}: imports {module}"


def test_ops_and_parallel_import_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
            "import seqwrap, seqwrap.ops, seqwrap.parallel, seqwrap.parallel.grad_sync, seqwrap.engines.kv_store\n"
            "import seqwrap.engines.seco_attention, seqwrap.engines.offload, seqwrap.engines.chunk_loss\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_seco_and_mst_steps_raise_no_future_warning():
    pytest.importorskip("transformers")
    import seqwrap
    from tests.hf_tiny import tiny_model

    ids = torch.randint(0, 61, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model = tiny_model("llama")
        seqwrap.SeCO(model, chunk_size=5)(ids)
        seqwrap.SpaCO(model, chunk_size=5, rate=0.5, seed=1)(ids)
        seqwrap.hf.enable_checkpointing(model)
        model.train()
        seqwrap.SeCO(model, chunk_size=5)(ids)
        mst = seqwrap.apply_minisequence(tiny_model("qwen3"), mlp_chunks=2)
        mst(input_ids=ids, labels=ids).loss.backward()
