"""Communication/compute model of context-parallel segment attention (K/V all-gather).

Per decoder layer and CP rank, for S tokens split over `cp` ranks:
- forward all-gather: the rank receives the K and V of the other ranks,
  (cp - 1) / cp * 2 * S * kv_heads * head_dim * bytes;
- backward reduce-scatter of dK, dV: the same volume again;
- attention FLOPs of the rank's S / cp queries: forward 4 * (S / cp) * S * visible * heads * head_dim
  (QK^T and PV, 2 FLOPs per multiply-add; `visible` = fraction of key positions a query sees,
  about 1/2 for causal and FocuSFT masks), backward 2.5x forward;
- the layer's other compute: 2 FLOPs per weight per token forward (QKV, output, MLP), 2x backward.
Communication hides behind compute when it can run while the rank computes: with the K/V of
the rank's own chunk (and of the chunks already received) attention can start before the
gather ends, so the forward gather is hidden when it takes less time than the forward
attention; the backward reduce-scatter overlaps the backward of the linears below attention.
`python -m megatron_focusft.parallel.cp_cost_model` prints the table of docs/CONTEXT_PARALLEL.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    bytes_per_value: int = 2  # bf16


LLAMA3_8B = AttentionShape(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336)


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float  # achieved per-GPU bandwidth of the collective


@dataclass(frozen=True)
class LayerCost:
    seq_length: int
    cp: int
    kv_bytes_fwd: float
    attn_flops_fwd: float
    other_flops_fwd: float

    def comm_s(self, link: Link) -> float:
        return self.kv_bytes_fwd / link.bytes_per_s

    def attn_s(self, flops_per_s: float) -> float:
        return self.attn_flops_fwd / flops_per_s


def layer_cost(shape: AttentionShape, seq_length: int, cp: int, visible: float = 0.5) -> LayerCost:
    kv_full = 2 * seq_length * shape.kv_heads * shape.head_dim * shape.bytes_per_value
    local_queries = seq_length / cp
    attn = 4 * local_queries * seq_length * visible * shape.heads * shape.head_dim
    weights = (shape.hidden * (shape.heads + 2 * shape.kv_heads) * shape.head_dim  # QKV
               + shape.heads * shape.head_dim * shape.hidden  # output projection
               + 3 * shape.hidden * shape.ffn)  # SwiGLU MLP
    return LayerCost(seq_length, cp, (cp - 1) / cp * kv_full, attn, 2 * weights * local_queries)


# Achieved, not peak: NCCL all-gather bus bandwidth inside an NVLink-4 (H100 SXM) node, and one
# 400 Gb/s InfiniBand NIC per GPU across nodes; attention at ~50% of the 989 TFLOP/s bf16 peak.
NVLINK = Link("NVLink (intra-node)", 350e9)
INFINIBAND = Link("InfiniBand 400G (inter-node)", 45e9)
ATTENTION_FLOPS_PER_S = 500e12


def table(shape: AttentionShape = LLAMA3_8B, seq_lengths=(32768, 65536, 131072), cps=(2, 4, 8)) -> str:
    rows = ["| S | CP | K/V in, MiB | attn GFLOP | FLOP/byte | comm NVLink ms | comm IB ms | attn ms | "
            "hidden on NVLink | hidden on IB |", "|" + " --- |" * 10]
    for s in seq_lengths:
        for cp in cps:
            c = layer_cost(shape, s, cp)
            comm_nv, comm_ib, attn = c.comm_s(NVLINK), c.comm_s(INFINIBAND), c.attn_s(ATTENTION_FLOPS_PER_S)
            rows.append(f"| {s // 1024}K | {cp} | {c.kv_bytes_fwd / 2**20:.0f} | {c.attn_flops_fwd / 1e9:.0f} | "
                        f"{c.attn_flops_fwd / c.kv_bytes_fwd:.0f} | {comm_nv * 1e3:.2f} | {comm_ib * 1e3:.2f} | "
                        f"{attn * 1e3:.2f} | {'yes' if comm_nv < attn else 'no'} | "
                        f"{'yes' if comm_ib < attn else 'no'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
