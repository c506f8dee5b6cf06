"""The private torch ops seqwrap calls (seqwrap/ops/attention_blocks.py), pinned one by one: each exists with the
argument list seqwrap passes, and the CPU one computes what seqwrap relies on (the output and the row
log-sum-exp of softmax attention, and their gradients). A torch release that renames or changes one fails the
test that names it. (No public op returns the LSE of the fused CPU/CUDA kernels: SDPA returns the output only, and
flex_attention(return_aux=AuxRequest(lse=True)) called without torch.compile uses, in torch's own words, "an
unfused implementation that materializes the full scores matrix".)"""
import pytest
import torch

# op -> the schema seqwrap's calls are written against (torch 2.13 / 2.14)
PRIVATE_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu":
        "(Tensor query, Tensor key, Tensor value, float dropout_p=0., bool is_causal=False, *, "
        "Tensor? attn_mask=None, float? scale=None) -> (Tensor output, Tensor logsumexp)",
    "_scaled_dot_product_flash_attention_for_cpu_backward":
        "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, "
        "bool is_causal, *, Tensor? attn_mask=None, float? scale=None) -> "
        "(Tensor grad_query, Tensor grad_key, Tensor grad_value)",
    "_scaled_dot_product_efficient_attention":
        "(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., "
        "bool is_causal=False, *, float? scale=None) -> "
        "(Tensor output, Tensor log_sumexp, Tensor philox_seed, Tensor philox_offset)",
    "_scaled_dot_product_efficient_attention_backward":
        "(Tensor grad_out_, Tensor query, Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, "
        "Tensor philox_seed, Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, bool is_causal=False, "
        "*, float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)",
}


@pytest.mark.parametrize("name", sorted(PRIVATE_OPS))
def test_private_op_has_the_schema_seqwrap_calls(name):
    op = getattr(torch.ops.aten, name, None)
    assert op is not None, f"torch {torch.__version__} has no aten::{name}"
    schema = str(op.default._schema)
    assert schema == f"aten::{name}{PRIVATE_OPS[name]}", schema


def test_the_cpu_flash_op_returns_output_and_row_lse_and_their_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g) for _ in range(3))
    mask = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    mask[..., 3:] = float("-inf")  # keys 3, 4 masked out
    scale = 0.3
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) * scale + mask
    ref_out = torch.softmax(s, -1) @ leaves[2]
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).detach(), rtol=1e-12, atol=1e-12)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    ref = torch.autograd.grad(ref_out, leaves, dout)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
