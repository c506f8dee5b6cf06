"""What the family census (tests/test_family_census.py) currently finds that is not right, family by family.

OFFENDERS: (family, engine) -> (status, root cause, measured). Every entry is a bug or a missing refusal
in seqwrap that someone is fixing; the census test fails on any wrong/error result NOT listed here, and
also on a listed entry that no longer occurs (delete it when the fix lands: the list can only shrink).
engine: "seco", "mst", or "seco_concat" (SeCO with attention='concat', run after a refusal that
suggests it). Measured on transformers 5.24.0 / torch 2.13.0: worst relative gradient error, loss error.

CANNOT_BUILD: family -> why its tiny twin cannot be built or run on its own (nothing checked). A family
that starts or stops building also fails the test, so a shrinker regression cannot hide a family.
"""

OFFENDERS: dict[tuple[str, str], tuple[str, str, str]] = {}

# The same for other transformers releases (the matrix columns of `make test-oldest` / `make test-latest`):
# installed version -> offenders found there and not fixed yet, each with what was measured.
_F32 = ("1.3e-07 relative (float32 level) in attention; a single chunk (no chunking) differs from HF 5.15's "
        "forward by the same amount, so it is a cast inside 5.15's Gemma-2-style code that seqwrap's attention "
        "does not repeat, not the chunking; cause not found yet")
OFFENDERS_AT: dict[str, dict[tuple[str, str], tuple[str, str, str]]] = {
    "5.15.1": {("gemma2", "seco"): ("wrong", _F32, "1e-07"), ("vaultgemma", "seco"): ("wrong", _F32, "1e-07")},
}

CANNOT_BUILD: dict[str, str] = {
    "blt": "BltConfig has no global num_hidden_layers (heterogeneous sub-models); the forward reads it",
    "dbrx": "HF 5.24 itself: DbrxForCausalLM(DbrxConfig(...)) fails, DbrxAttentionConfig has no rope_theta",
    "gemma3n": "needs the timm library (vision tower)",
    "gemma4": "heterogeneous per-layer config: full_attention layers not homogeneous after the layer selection",
    "gemma4_assistant": "the default config does not validate (hidden_size_per_layer_input must be 0)",
    "gemma4_unified": "heterogeneous per-layer config: full_attention layers not homogeneous after the layer selection",
    "gemma4_unified_assistant": "KV-sharing layer types do not match after the layer selection",
    "git": "GIT needs pixel_values (its loss shifts over the image tokens)",
    "musicgen": "input_ids are (batch x codebooks, T): a text sequence is not a valid input",
    "musicgen_melody": "input_ids are (batch x codebooks, T): a text sequence is not a valid input",
}
