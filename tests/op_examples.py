"""Valid example calls of every op in seqwrap._C._op_registry(), for tests/test_op_contracts.py.

EXAMPLES[name] gives what the registry's spec cannot: sizes for the symbolic dims ("dims"), shapes of
tensors the spec leaves free ("shapes", one per list item for list arguments), values that must
satisfy the kernel (labels in range, probabilities in (0, 1]: "fill"), scalar values ("values"), and
optional tensors to pass as None ("none"). Everything else (dtypes, shapes, which tensors exist) comes
from the spec, so a new call-path op needs one entry here and nothing else. An op whose valid inputs
the spec cannot describe (the scan backward needs the forward's checkpoints; random A would
overflow) gives a "build" function instead, returning every argument of its spec by name.
"""
from __future__ import annotations

import torch

import seqwrap

from .scan_reference import random_inputs
from .ssd_reference import random_ssd_inputs

C = seqwrap._C
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}


def real(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan_fwd(g):
    u, dt, A, B, Cm, D, z, h0 = random_inputs(batch=2, dim=3, dstate=4, length=5, dtype=torch.float32,
                                              seed=int(torch.randint(0, 1000, (1,), generator=g)), requires_grad=False)
    return dict(u=u, dt=dt, A=A, B=B, C=Cm, D=D, z=z, h0=h0, y=torch.empty(2, 3, 5), hlast=torch.empty(2, 3, 4),
                ckpt=torch.empty(2, 3, 1, 4), block=64, work=None, stream=0, reset=None)


def _scan_bwd(g):
    a = _scan_fwd(g)
    C.selective_scan_fwd(**a)
    e = torch.empty
    return dict(u=a["u"], dt=a["dt"], A=a["A"], B=a["B"], C=a["C"], D=a["D"], z=a["z"], ckpt=a["ckpt"],
                dy=torch.randn(2, 3, 5, generator=g), dhlast=None, du=e(2, 3, 5), ddt=e(2, 3, 5), dz=e(2, 3, 5),
                dB=torch.zeros(2, 4, 5), dC=torch.zeros(2, 4, 5), dA=e(2, 3, 4), dD=e(2, 3), dh0=e(2, 3, 4), block=64,
                trunc=0, grad_len=5, work=None, stream=0, reset=None)


_SSD = dict(batch=2, length=5, heads=4, headdim=3, groups=2, dstate=6)


def _ssd_fwd(g, block=64):
    x, dt, A, B, Cm, D, z, h0 = random_ssd_inputs(**_SSD, dtype=torch.float32, requires_grad=False,
                                                  seed=int(torch.randint(0, 1000, (1,), generator=g)))
    nblk = -(-5 // block)
    return dict(x=x, dt=dt, A=A, B=B, C=Cm, D=D, z=z, h0=h0, y=torch.empty(2, 5, 4, 3), hlast=torch.empty(2, 4, 3, 6),
                ckpt=torch.empty(2, 4, 3, nblk, 6), block=block, work=None, stream=0, reset=None)


def _ssd_bwd(g):
    a = _ssd_fwd(g, block=2)
    C.ssd_scan_fwd(**a)
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    return dict(x=a["x"], dt=a["dt"], A=a["A"], B=a["B"], C=a["C"], D=a["D"], z=a["z"], ckpt=a["ckpt"],
                dy=torch.randn(2, 5, 4, 3, generator=g), dhlast=None, dx=z(2, 5, 4, 3), ddt=z(2, 5, 4),
                dz=z(2, 5, 4, 3), dB=z(2, 5, 2, 6), dC=z(2, 5, 2, 6), dA=z(2, 4, 3), dD=z(2, 4, 3), dh0=z(2, 4, 3, 6),
                block=2, work=None, stream=0, trunc=0, grad_len=5, reset=None)


EXAMPLES = {
    "kahan_accumulate": dict(shapes={"accs": [(3,), (2, 5)]}, values={"scale": 0.5}),
    "cross_entropy_chunk": dict(
        dims={"rows": 4, "V": 7}, none={"error_flag"},
        fill={"labels": lambda shape, dtype, g: torch.randint(0, 7, shape, generator=g, dtype=dtype),
              "grad_scale": lambda shape, dtype, g: torch.rand(shape, generator=g).to(dtype) + 0.5},
        values={"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 0.0,
                "compute_grad": True, "row_offset": 0}),
    "lse_merge": dict(dims={"...": (2, 3), "D": 4}),
    "_round_to_half": dict(shapes={"src": (2, 5)}),
    "sample_chunks": dict(
        dims={"k": 5},
        fill={"probs": lambda shape, dtype, g: torch.rand(shape, generator=g, dtype=dtype) * 0.8 + 0.2},
        values={"seed": 3, "step": 1, "mode": "bernoulli", "budget": 0, "cap": 0.0}),
    "selective_scan_fwd": dict(build=_scan_fwd),
    "selective_scan_bwd": dict(build=_scan_bwd),
    "ssd_scan_fwd": dict(build=_ssd_fwd),
    "ssd_scan_bwd": dict(build=_ssd_bwd),
}

# The torch custom op over each C op (seqwrap/ops/library.py, seqwrap/ops/ssd_scan.py), with the map
# from the C call's keyword arguments to the custom op's positional ones; None: not registered, why.
_NO_STREAM = "drop"
CUSTOM_OPS = {
    "kahan_accumulate": ("kahan_accumulate_", _NO_STREAM),
    "cross_entropy_chunk": ("cross_entropy_chunk_", _NO_STREAM),
    "lse_merge": ("lse_merge_", _NO_STREAM),
    "_round_to_half": None,  # a test hook of the core's rounding, never called by a model
    "sample_chunks": None,   # runs in the engines' step logic; its 64-bit seed does not fit an int64 schema
    "selective_scan_fwd": ("selective_scan_fwd", lambda a: (a["u"], a["dt"], a["A"], a["B"], a["C"], a["D"],
                                                           a["z"], a["h0"], a["block"], 0, -1, None)),
    "selective_scan_bwd": ("selective_scan_bwd", lambda a: (a["u"], a["dt"], a["A"], a["B"], a["C"], a["D"],
                                                           a["z"], a["ckpt"], a["dy"], a["dhlast"], a["block"],
                                                           a["trunc"], a["grad_len"], None)),
    "ssd_scan_fwd": ("ssd_scan_fwd", lambda a: (a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["h0"],
                                                a["block"])),
    "ssd_scan_bwd": ("ssd_scan_bwd", lambda a: (a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["ckpt"],
                                                a["dy"], a["dhlast"], a["block"])),
}


def example(op_name: str) -> dict:
    assert op_name in EXAMPLES, (f"op {op_name!r} has no entry in tests/op_examples.py EXAMPLES: add its example "
                                 "sizes so every contract test covers it")
    return EXAMPLES[op_name]


def allowed_dtypes(arg: dict, built: dict) -> list:
    """The dtypes the spec allows for tensor argument `arg`, given the tensors built before it."""
    base = [DTYPES[n] for n in arg["dtypes"]]
    ref = built.get(arg["dtype_ref"]) if arg["dtype_ref"] else None
    if isinstance(ref, (list, tuple)):
        ref = ref[0]
    rule = arg["dtype_rule"]
    if ref is None or rule == "any_of":
        return base
    if rule == "same_as":
        return [d for d in base if d == ref.dtype]
    if rule == "real_of":
        return [d for d in base if d == real(ref.dtype)]
    return [d for d in base if real(d) == real(ref.dtype)]


def spec_shape(arg: dict, ex: dict, built: dict, idx: int | None) -> tuple:
    if arg["shape_like"]:
        ref = built[arg["shape_like"]]
        return tuple((ref[idx] if isinstance(ref, list) else ref).shape)
    if arg["shape"] is None:
        assert arg["name"] in ex.get("shapes", {}), f"example lacks shapes[{arg['name']!r}] (its spec fixes no shape)"
        s = ex["shapes"][arg["name"]]
        return tuple(s[idx] if idx is not None else s)
    dims = []
    for tok in arg["shape"].split(","):
        if tok == "...":
            dims += list(ex["dims"]["..."])
        elif tok == "*":
            dims.append(3)
        elif tok.isdigit():
            dims.append(int(tok))
        else:
            assert tok in ex["dims"], f"example lacks dims[{tok!r}]"
            dims.append(ex["dims"][tok])
    return tuple(dims)


def _tensor(arg, ex, built, idx, g):
    shape = spec_shape(arg, ex, built, idx)
    allowed = allowed_dtypes(arg, built)
    dtype = torch.float32 if torch.float32 in allowed else allowed[0]
    fill = ex.get("fill", {}).get(arg["name"])
    if fill:
        return fill(shape, dtype, g)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 3, shape, generator=g, dtype=dtype)


def _scalar(arg, ex):
    if arg["name"] in ex.get("values", {}):
        return ex["values"][arg["name"]]
    if arg["default"] is not None:
        return arg["default"]
    kind = arg["kind"]
    if kind == "int":
        return max(arg["min"], 0) if arg["min"] is not None else 0
    if kind == "uint64":
        return 0
    if kind == "float":
        return arg["min"] if arg["min"] is not None else 0.0
    if kind == "bool":
        return True
    if kind == "choice":
        return arg["choices"][0]
    return None  # stream


def build(op: dict, seed: int = 0) -> dict:
    """Keyword arguments of a valid call of `op` (a registry entry), fresh tensors, deterministic in seed."""
    ex = example(op["name"])
    g = torch.Generator().manual_seed(seed)
    if "build" in ex:
        return ex["build"](g)
    built = {}
    n_items = max((len(v) for v in ex.get("shapes", {}).values() if isinstance(v, list)), default=2)
    for arg in op["args"]:
        name, kind = arg["name"], arg["kind"]
        if kind == "tensor list":
            built[name] = [_tensor(arg, ex, built, i, g) for i in range(n_items)]
        elif kind in ("tensor", "optional tensor"):
            built[name] = None if name in ex.get("none", ()) else _tensor(arg, ex, built, None, g)
        else:
            built[name] = _scalar(arg, ex)
    return built


def tensors(kwargs: dict):
    """(label, argument name, list index or None, tensor) for every tensor of a call, in call order."""
    out = []
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out.append((name, name, None, v))
        elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            out += [(f"{name}[{i}]", name, i, t) for i, t in enumerate(v)]
    return out


def replace(kwargs: dict, name: str, idx, value) -> dict:
    """A shallow copy of the call with one tensor (or list item) replaced."""
    new = dict(kwargs)
    if idx is None:
        new[name] = value
    else:
        new[name] = list(new[name])
        new[name][idx] = value
    return new


def written(op: dict, kwargs: dict):
    return [(label, t) for label, name, _, t in tensors(kwargs) if name in op["writes"]]
