"""Packed rows: several examples laid end to end in one row of a forward batch, with no padding between them.

Still FAST: no token attends across examples. Transformers (5.x) treats position ids that
restart at 0 inside a row, given no attention mask, as the start of another sequence
(`masking_utils.find_packed_sequence_indices`): sdpa, eager and flex attention get a
document mask (causal, and confined to each example), and flash attention runs each
example as its own variable-length sequence. The restarted positions also give RoPE
what it sees when the example runs alone. Whether a model honours this is checked
before it is used (`extract_activations.choose_row_tokens`), because a model that
builds its own mask would let the examples of a row see each other.

Rows are grouped into batches as padded batches group examples (by length, longest
first, within the token budget), and a batch is as wide as its widest row; what is left
at a row's end is filled with pad tokens whose positions restart at 0 too, so they form
a dummy example of their own that no real token attends to.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from torch import nn

from fastsae.lm.hook_points import decoder_layers

# Kernels that compute only the query-key pairs inside each example: flash attention runs
# the examples as variable-length sequences (one row per batch), flex attention skips the
# masked-out blocks. Dense-mask kernels (sdpa, eager) compute every pair of a row.
EXAMPLE_CONFINED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")

# Dense-mask attention in a W-token row costs about 4·W·d_attn FLOPs per token against
# 2·P for the block's matmuls (P: parameters per block). Rows are kept to W = P / (24·d_attn),
# where that is a twelfth: on the 2-core CPU, SmolLM2 (W = 256) ran rows of 61 to 256 tokens
# at the same tokens/s, 512-token rows about 15% slower and 2048-token rows at half speed.
DENSE_ATTENTION_SHARE = 1 / 12


def packed_row_tokens(model: nn.Module, batch_tokens: int, longest: int) -> int:
    """How wide a packed row may be: the whole batch where attention stays inside each example, else as wide as dense
    attention stays cheap (see DENSE_ATTENTION_SHARE); never narrower than the longest example."""
    config = model.config
    if config._attn_implementation in EXAMPLE_CONFINED_ATTENTION:
        return batch_tokens
    block_parameters = sum(parameter.numel() for parameter in decoder_layers(model)[0].parameters())
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    attention_width = heads * head_dim if heads and head_dim else config.hidden_size
    affordable = int(DENSE_ATTENTION_SHARE * block_parameters / (2 * attention_width))
    return min(batch_tokens, max(longest, affordable))


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, joins the fullest row that still has room for it, or opens a row.

    Row r holds the examples `rows[r]`, laid end to end in that order. Rows come out in the order they were opened,
    so the first ones hold the longest examples.
    """
    if lengths and max(lengths) > row_tokens:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {row_tokens}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: bisect finds the fullest row that fits
    for index in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        slot = bisect.bisect_left(room, (lengths[index], -1))
        if slot < len(room):
            free, row = room.pop(slot)
        else:
            free, row = row_tokens, len(rows)
            rows.append([])
        rows[row].append(index)
        if free > lengths[index]:
            bisect.insort(room, (free - lengths[index], row))
    return rows


def packed_batch(rows: list[list[np.ndarray]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and position ids of rows of sequences laid end to end, T the widest row.

    Positions restart at 0 at every sequence, and at the pad tokens that fill a row's end.
    """
    widths = [sum(len(sequence) for sequence in row) for row in rows]
    width = max(widths)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row_index, row in enumerate(rows):
        start = 0
        for sequence in [*row, np.full(width - widths[row_index], pad_token_id)]:
            input_ids[row_index, start : start + len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
            position_ids[row_index, start : start + len(sequence)] = torch.arange(len(sequence))
            start += len(sequence)
    return input_ids, position_ids
