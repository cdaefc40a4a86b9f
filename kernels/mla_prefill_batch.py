"""All prefill chunks of a step: short ones attended together in padded groups, long ones chunk by chunk.

A step often brings many short prefill chunks (new prompts of tens or hundreds of tokens). Attending them
one by one costs a few dozen small ops each, per layer: Python time on CPU, kernel launches on GPU. So
`plan_prefill` (once per step, on the host) packs consecutive short chunks into groups whose padded size,
sequences x queries x keys, stays within `GROUP_PAIRS` per head; each group is one gather of whole
cache blocks, one expansion matmul and one masked softmax over [G, H, L, S] (float32 scores of at most
2 MiB per head at the default). A chunk too large for any group
goes through `kernels.mla_prefill.mla_prefill`, whose memory is bounded by its key chunks and query tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from k2serve.kernels.latent_cache import dequantize, gather_blocks
from k2serve.kernels.mla_prefill import PrefillSeq, expand_latents, mla_prefill

GROUP_PAIRS = 1 << 19


@dataclass(frozen=True)
class PrefillGroup:
    """G prefill chunks padded to L queries and S keys (S a whole number of blocks)."""

    rows: torch.Tensor  # [G, L] int64: each query's token row; padding repeats the chunk's last row
    blocks: torch.Tensor  # [G, S / block_size] int64: cache blocks of each context (0 past its end)
    masked: torch.Tensor  # [G, 1, L, S] bool: the key lies after the query or past the context
    out_rows: torch.Tensor  # [n] int64: token rows of the real queries
    out_index: torch.Tensor  # [n] int64: their positions in the flattened [G * L] queries


@dataclass(frozen=True)
class PrefillPlan:
    groups: list[PrefillGroup] = field(default_factory=list)
    long: list[PrefillSeq] = field(default_factory=list)


def plan_prefill(seqs: list[tuple[int, int, int, list[int]]], block_size: int, device: torch.device | str,
                 pairs: int = GROUP_PAIRS) -> PrefillPlan:
    """Group the chunks `seqs` = (start row, end row, context_len, block table) of one step."""
    plan, pending = PrefillPlan(), []
    for seq in seqs:
        if _padded_pairs([seq], block_size) > pairs:
            plan.long.append(PrefillSeq(seq[0], seq[1], seq[2], torch.tensor(seq[3], dtype=torch.long, device=device)))
        elif _padded_pairs(pending + [seq], block_size) > pairs:
            plan.groups.append(_group(pending, block_size, device))
            pending = [seq]
        else:
            pending.append(seq)
    if pending:
        plan.groups.append(_group(pending, block_size, device))
    return plan


def _padded_pairs(seqs, block_size: int) -> int:
    longest_q = max(end - start for start, end, _, _ in seqs)
    longest_k = max(-(-(ctx + end - start) // block_size) * block_size for start, end, ctx, _ in seqs)
    return len(seqs) * longest_q * longest_k


def _group(seqs, block_size: int, device) -> PrefillGroup:
    num_q = max(end - start for start, end, _, _ in seqs)
    num_blocks = max(-(-(ctx + end - start) // block_size) for start, end, ctx, _ in seqs)
    rows, blocks, q_pos, seq_lens, out_rows, out_index = [], [], [], [], [], []
    for g, (start, end, ctx, table) in enumerate(seqs):
        n = end - start
        rows.append([start + min(i, n - 1) for i in range(num_q)])
        blocks.append(table[:num_blocks] + [0] * (num_blocks - len(table[:num_blocks])))
        q_pos.append([ctx + min(i, n - 1) for i in range(num_q)])
        seq_lens.append(ctx + n)
        out_rows += range(start, end)
        out_index += range(g * num_q, g * num_q + n)
    long = dict(dtype=torch.long, device=device)
    k_pos = torch.arange(num_blocks * block_size, device=device)  # [S]
    q_pos_t = torch.tensor(q_pos, **long)[:, :, None]  # [G, L, 1]
    masked = (k_pos > q_pos_t) | (k_pos >= torch.tensor(seq_lens, **long)[:, None, None])  # [G, L, S]
    return PrefillGroup(torch.tensor(rows, **long), torch.tensor(blocks, **long), masked[:, None],
                        torch.tensor(out_rows, **long), torch.tensor(out_index, **long))


def attend_group(q: torch.Tensor, cache: torch.Tensor, group: PrefillGroup, w_kv: torch.Tensor, sm_scale: float,
                 kv_scale: float, out: torch.Tensor) -> None:
    """The group's queries (rows of q [T, H, Dn + Dr]) over their contexts; results into rows of out [T, H, Dv]."""
    (num_seqs, num_q), heads = group.rows.shape, q.shape[1]
    nope_dim = q.shape[-1] - (cache.shape[-1] - w_kv.shape[-1])
    qg = q.index_select(0, group.rows.flatten()).view(num_seqs, num_q, heads, -1).transpose(1, 2)  # [G, H, L, Dqk]
    ctx = dequantize(gather_blocks(cache, group.blocks.flatten()), kv_scale, q.dtype)
    k, v = expand_latents(ctx.view(num_seqs, -1, cache.shape[-1]), w_kv, nope_dim)  # [G, H, S, Dqk], [G, H, S, Dv]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(sm_scale)  # [G, H, L, S]
    probs = scores.masked_fill_(group.masked, float("-inf")).softmax(dim=-1).to(v.dtype)
    result = torch.matmul(probs, v).transpose(1, 2).reshape(num_seqs * num_q, heads, -1)  # [G * L, H, Dv]
    out[group.out_rows] = result.index_select(0, group.out_index)


def prefill(q: torch.Tensor, cache: torch.Tensor, plan: PrefillPlan, w_kv: torch.Tensor, sm_scale: float,
            kv_scale: float, out: torch.Tensor) -> None:
    """Every chunk of `plan`: groups at once, long chunks one by one (memory-bounded)."""
    for group in plan.groups:
        attend_group(q, cache, group, w_kv, sm_scale, kv_scale, out)
    for s in plan.long:
        out[s.start: s.end] = mla_prefill(q[s.start: s.end], cache, s.block_table, s.context_len, w_kv,
                                          sm_scale, kv_scale)
