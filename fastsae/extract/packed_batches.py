"""Packed rows: several examples laid end to end in one row of a forward batch, with no padding between them.

Still FAST: no token attends across examples. Transformers (5.x) treats position ids that
restart at 0 inside a row, given no attention mask, as the start of another sequence
(`masking_utils.find_packed_sequence_indices`): sdpa, eager and flex attention get a
document mask (causal, and confined to each example), and flash attention runs each
example as its own variable-length sequence. The restarted positions also give RoPE
what it sees when the example runs alone. Whether a model honours this is checked
before it is used (`extract_activations.check_packing`, called by `choose_batching`),
because a model that builds its own mask would let the examples of a row see each other.

A batch is as wide as its widest row; what is left at a row's end is filled with pad
tokens whose positions restart at 0 too, so they form a dummy example of their own
that no real token attends to.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from torch import nn

from fastsae.lm.hook_points import decoder_layers

# Kernels that compute only the query-key pairs inside each example: flash attention runs
# the examples of a one-row batch as variable-length sequences, flex attention skips the
# masked-out blocks. Dense-mask kernels (sdpa, eager) compute every pair of a row.
EXAMPLE_CONFINED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")
ROW_WIDTH_FACTORS = (1, 1.5, 2, 3, 4, 6, 8)  # the row widths tried, in multiples of the longest example


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, joins the fullest row that still has room for it, or opens a row.

    Row r holds the examples `rows[r]`, laid end to end in that order.
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


def packed_row_batches(lengths: list[int], batch_tokens: int, row_tokens: int) -> list[list[list[int]]]:
    """Rows of up to `row_tokens` tokens (`pack_rows`), widest first, `batch_tokens // row_tokens` rows a batch (at least one)."""
    rows = sorted(pack_rows(lengths, row_tokens), key=lambda row: -sum(lengths[index] for index in row))
    rows_per_batch = max(1, batch_tokens // row_tokens)
    return [rows[start : start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]


def packed_tokens(lengths: list[int], batch_tokens: int, row_tokens: int) -> int:
    """How many tokens the batches of `packed_row_batches` hold, the filler at the rows' ends included."""
    return sum(len(rows) * sum(lengths[index] for index in rows[0]) for rows in packed_row_batches(lengths, batch_tokens, row_tokens))


def packed_row_tokens(model: nn.Module, lengths: list[int], batch_tokens: int) -> int:
    """The width of packed rows that computes `lengths` in the fewest FLOPs.

    Where attention stays inside each example, a row as wide as the batch: no filler at all, and one row a batch,
    which flash attention needs. A dense mask (sdpa, eager) computes every query-key pair of a row: per token,
    about 4·W·d_attn FLOPs in a W-token row, against 2·P for a block's matmuls (P its parameters). Wider rows leave
    less filler but cost more attention, so the width, tried at a few multiples of the longest example, is the one
    that minimises (tokens in the batches) × (1 + 2·W·d_attn / P).
    """
    config = model.config
    if config._attn_implementation in EXAMPLE_CONFINED_ATTENTION:
        return batch_tokens
    block_parameters = sum(parameter.numel() for parameter in decoder_layers(model)[0].parameters())
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    attention_width = heads * head_dim if heads and head_dim else config.hidden_size
    widths = {min(batch_tokens, int(factor * max(lengths))) for factor in ROW_WIDTH_FACTORS}
    return min(
        sorted(widths),
        key=lambda width: packed_tokens(lengths, batch_tokens, width) * (1 + 2 * width * attention_width / block_parameters),
    )


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
