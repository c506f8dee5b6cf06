"""What the family census (tests/test_family_census.py) currently finds that is not right, family by family.

OFFENDERS: (family, engine) -> (status, root cause, measured). Every entry is a bug or a missing refusal
in seqwrap that someone is fixing; the census test fails on any wrong/error result NOT listed here, and
also on a listed entry that no longer occurs (delete it when the fix lands: the list can only shrink).
engine: "seco", "mst", or "seco_concat" (SeCO with attention='concat', run after a refusal that
suggests it). Measured on transformers 5.24.0 / torch 2.13.0: worst relative gradient error, loss error.

CANNOT_BUILD: family -> why its tiny twin cannot be built or run on its own (nothing checked). A family
that starts or stops building also fails the test, so a shrinker regression cannot hide a family.
"""

_MLA = ("value head size != query/key head size (MLA): seqwrap/ops/attention_blocks.py:144 block_forward calls "
        "SDPA's flash kernel, which needs equal Q/K/V head sizes; fails mid-step, not refused")
_BERT_HEAD = ("SeCO's loss applies get_output_embeddings() (the final Linear) to the decoder's last hidden state "
              "and skips the rest of the LM head (BERT-style cls.predictions.transform / lm_head.dense + "
              "LayerNorm): those parameters get no gradient and every other gradient is off")
_ROUTER = ("output_router_logits=True: HF's loss adds router_aux_loss_coef x load-balancing loss; SeCO's chunked "
           "loss drops it (refused only for hybrid families, hf/hybrid.py check_model)")
_KWARGS = ("decoder layer calls self_attn without **kwargs, so seqwrap's `seqwrap_chunks` state never reaches the "
           "registered attention (seqwrap/hf/attention.py:72); use attention='concat' or pass kwargs through")
_CONCAT_MASK = ("attention='concat': the model builds its own (chunk x chunk) position bias / mask from the chunk "
                "length, not from [past ; chunk], so the shapes disagree")

OFFENDERS: dict[tuple[str, str], tuple[str, str, str]] = {
    # -- value head != query/key head (MiMo-V2-Flash and every MLA family) --
    ("axk1", "seco"): ("error", _MLA, "RuntimeError"),
    ("deepseek_v2", "seco"): ("error", _MLA, "RuntimeError"),
    ("deepseek_v3", "seco"): ("error", _MLA, "RuntimeError"),
    ("longcat_flash", "seco"): ("error", _MLA, "RuntimeError"),
    ("mimo_v2_flash", "seco"): ("error", _MLA, "RuntimeError"),
    ("minicpm3", "seco"): ("error", _MLA, "RuntimeError"),
    ("sarvam_mla", "seco"): ("error", _MLA, "RuntimeError"),
    ("youtu", "seco"): ("error", _MLA, "RuntimeError"),
    # -- decoder layers that drop kwargs (StableLM, Nemotron) --
    ("nemotron", "seco"): ("error", _KWARGS, "RuntimeError"),
    ("stablelm", "seco"): ("error", _KWARGS, "RuntimeError"),
    # -- attention called twice per layer --
    ("diffllama", "seco"): ("wrong", "DiffLlama's attention runs the attention function twice per layer (two "
                            "halves of V); the store/relay assumes once per layer per chunk",
                            "2e+00 attention, loss 4e-03"),
    # -- multi-module LM heads --
    ("modernbert-decoder", "seco"): ("wrong", "multi-module LM head (head dense + norm before decoder) skipped by "
                                     "SeCO's loss (see _BERT_HEAD)", "2e+00 norms, loss 3e-03"),
    ("bert", "seco"): ("wrong", _BERT_HEAD, "1e+00, loss 2e-03"),
    ("camembert", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 2e-03"),
    ("data2vec-text", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 5e-03"),
    ("ernie", "seco"): ("wrong", _BERT_HEAD, "1e+00, loss 2e-03"),
    ("roberta", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 5e-03"),
    ("roberta-prelayernorm", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 1e-02"),
    ("roc_bert", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 3e-03"),
    ("xlm-roberta", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 2e-03"),
    ("xlm-roberta-xl", "seco"): ("wrong", _BERT_HEAD, "2e+00, loss 2e-02"),
    ("xmod", "seco"): ("wrong", _BERT_HEAD, "1e+00, loss 2e-02"),
    ("electra", "seco"): ("error", _BERT_HEAD + " (here the skipped generator_predictions projects hidden 64 -> "
                          "embedding 32, so linear_cross_entropy's argument check fails mid-step)", "ValueError"),
    ("roformer", "seco_concat"): ("error", _BERT_HEAD + " (its head transform projects hidden 64 -> embedding 32 "
                                  "before the decoder; linear_cross_entropy's argument check fails mid-step)",
                                  "ValueError"),
    ("big_bird", "seco_concat"): ("wrong", _BERT_HEAD, "2e+00, loss 8e-03"),
    ("megatron-bert", "seco_concat"): ("wrong", _BERT_HEAD, "2e+00, loss 2e-03"),
    ("rembert", "seco_concat"): ("wrong", _BERT_HEAD, "1e+00, loss 2e-03"),
    # -- a missing refusal: a bidirectional encoder cannot be chunked causally --
    ("bert[bidirectional]", "seco"): ("wrong", "is_decoder=False: BERT attends both ways, SeCO chunks it as if "
                                      "causal without refusing (and skips the head transform)", "2e+00, loss 2e-03"),
    # -- layer kinds taken from config.sliding_window while the model masks without a window --
    ("moshi", "seco"): ("wrong", "cache_utils.get_layer_types_and_kwargs calls every Moshi layer sliding "
                        "(config.sliding_window), so SeCO attends a window; MoshiModel masks with create_causal_mask "
                        "(no window) and attends the whole past", "1e+00 norms, loss 1e-05"),
    # -- LongRoPE decided per call --
    ("phi3[longrope]", "seco"): ("wrong", "HF's longrope_frequency_update picks short/long factors from the max "
                                 "position of each call: chunks before original_max_position_embeddings get the short "
                                 "factors while full backprop uses the long ones throughout", "4e-02, loss 6e-05"),
    # -- router auxiliary loss --
    ("mixtral[router-aux]", "seco"): ("wrong", _ROUTER, "9e-02 mlp (router gate), loss 4e-04"),
    ("qwen3_moe[router-aux]", "seco"): ("wrong", _ROUTER, "7e-01 mlp (router gate), loss 4e-04"),
    # -- a recurrent family that is not refused up front --
    ("xlstm", "seco"): ("error", "xLSTM has no attention layers and keeps its state in its own xLSTMCache; SeCO "
                        "hands it a ChunkCache and the forward reads cache.rnn_state (AttributeError) instead of "
                        "seqwrap refusing the family before the step", "AttributeError"),
    # -- attention='concat' with models that build their own masks/biases from the chunk --
    ("cpmant", "seco_concat"): ("error", _CONCAT_MASK + " (position bias 76 vs 44 keys)", "RuntimeError"),
    ("xlm", "seco_concat"): ("error", _CONCAT_MASK + " (mask (B,1,1,12) vs scores (B,H,12,24))", "RuntimeError"),
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
