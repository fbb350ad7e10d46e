"""The CP cost model's formulas against hand-computed values."""

from megatron_focusft.parallel.cp_cost_model import LLAMA3_8B, NVLINK, AttentionShape, layer_cost


def test_llama3_8b_32k_cp4_by_hand():
    c = layer_cost(LLAMA3_8B, 32768, 4)
    # K and V of 8 heads x 128 dims in bf16 = 4096 bytes per token; a rank receives 3/4 of them.
    assert c.kv_bytes_fwd == 0.75 * 32768 * 4096
    # 8192 local queries x 32768 keys x 1/2 visible x 32 heads x 128 dims x 4 FLOPs
    assert c.attn_flops_fwd == 8192 * 32768 * 0.5 * 32 * 128 * 4
    assert abs(c.comm_s(NVLINK) - 0.75 * 32768 * 4096 / 350e9) < 1e-15


def test_no_communication_without_context_parallelism():
    shape = AttentionShape(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128)
    assert layer_cost(shape, 1024, 1).kv_bytes_fwd == 0
    # other compute: 2 FLOPs per weight per local token
    weights = 64 * (4 + 4) * 16 + 4 * 16 * 64 + 3 * 64 * 128
    assert layer_cost(shape, 1024, 2).other_flops_fwd == 2 * weights * 512
