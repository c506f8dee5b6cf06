"""Which SSM / hybrid families the chunked engines (SeCO, SpaCO) drive, and why the others are refused.

A recurrent layer is driven through the HF cache (hybrid_cache.HybridChunkCache): its mixer reads
the state entering the chunk and writes the state after it, and the engine relays the state's
adjoint between chunks. That is exact only if the mixer's *multi-token cached* path continues a
sequence correctly, which was checked per mixer (transformers 5.15 and 5.24):

  mamba2, bamba, nemotron_h, granitemoehybrid, zamba2 (Mamba-2 / SSD mixers): the conv input is
      [cached conv state ; new inputs] (update_conv_state) and the chunked SSD scan starts from the
      cached recurrent state (initial_states) and returns the final one. Exact. During a step their
      mixers run the same forward on seqwrap's SSD kernel (mamba2_mixer.py), for memory.
  qwen3_next (gated DeltaNet): same conv handling; torch_chunk_gated_delta_rule takes
      initial_state and returns the final state. Exact.
  mamba, jamba (Mamba-1 mixers): the multi-token path runs the selective scan from a zero state,
      ignoring the cached SSM state: through HF's forward, chunks after the first would be wrong. During
      a step their mixers run seqwrap's forward instead (mamba1_mixer.py: same maths, seqwrap's
      selective scan started from the cached state). Exact. (seqwrap.AdjointSharding stays the
      SSM-specific API for HF Mamba, with its sharded / truncated modes.)
  falcon_mamba: a Mamba-1 mixer with its own norms, not checked: refused.

Model-specific conditions are listed in REQUIREMENTS and checked by check_model().
"""
from __future__ import annotations

from .compat import UnsupportedModelError

# kinds of layer (transformers' layer_types) that keep a recurrent state; "hybrid" layers keep K/V too
STATE_KINDS = ("linear_attention", "hybrid")
# layers that keep nothing in the cache (NemotronH's MLP / MoE blocks: "dummy" >= 5.2x, "mlp" / "moe" in 5.15)
STATELESS_KINDS = ("dummy", "mlp", "moe")

SUPPORTED = ("mamba2", "bamba", "nemotron_h", "granitemoehybrid", "zamba2", "qwen3_next", "mamba", "jamba")

_MAMBA1 = ("its Mamba-1 mixer's multi-token cached forward runs the selective scan from a zero state and "
           "ignores the cached SSM state, so a chunk cannot continue the previous one")
REFUSED = {
    "falcon_mamba": _MAMBA1 + " (seqwrap's own Mamba-1 mixer forward covers HF Mamba and Jamba, not FalconMamba's "
                    "extra norms)",
}


def check_family(mtype: str, kinds, engine: str) -> None:
    """Raises UnsupportedModelError unless model_type `mtype` with these layer kinds can be chunked."""
    odd = sorted({k for k in kinds if k in STATE_KINDS + STATELESS_KINDS})
    if mtype in REFUSED:
        raise UnsupportedModelError(f"seqwrap.{engine} does not support model_type '{mtype}' (layers of type "
                                    f"{odd}): {REFUSED[mtype]}")
    if mtype not in SUPPORTED:
        raise UnsupportedModelError(
            f"seqwrap.{engine} does not support model_type '{mtype}': it has layers of type {odd}, and recurrent "
            f"layers are chunked only for the families whose cached multi-token path was checked to continue a "
            f"sequence exactly ({', '.join(SUPPORTED)})")


def check_model(causal_lm, attention: str, engine: str) -> None:
    """Per-model conditions of the supported families (config values the chunked step cannot honour)."""
    config = causal_lm.config
    mtype = config.model_type
    z_loss = getattr(config, "z_loss_coefficient", 0.0) or 0.0
    if z_loss:
        raise UnsupportedModelError(
            f"seqwrap.{engine}: model_type '{mtype}' has z_loss_coefficient={z_loss}; its z-loss averages "
            "logsumexp^2 over every position of the batch (ignored labels included), which the chunked loss "
            "does not reproduce; set it to 0")
    if mtype == "zamba2" and attention == "chunked":
        raise UnsupportedModelError(
            f"seqwrap.{engine}: model_type 'zamba2' shares its attention blocks between layers (their "
            "layer_idx is -1; the layer index reaches only the cache), so the chunked attention cannot tell "
            f"the layers apart; use seqwrap.{engine}(model, attention='concat')")
