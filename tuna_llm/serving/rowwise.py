"""Row-wise computation: each row of a batch computed exactly as it would be alone.

Greedy answers must not depend on what a request was batched with (the evaluation decodes batched; the API
decodes whatever arrives together; a user compares both). Two things break that, in bf16 and in fp32:

- Attention over a padded batch reduces over every key column, the padding included; the masked columns add
  nothing in exact arithmetic but change how the sums are grouped. ``rows_attention`` computes each row's
  attention on its own columns only, with the very call an unpadded sequence makes. Registered with
  transformers as the attention implementation ``ROWS`` (masks made as for SDPA). A row's real tokens are
  one run of columns: right-aligned (left padding, as ``DecodeBatch`` keeps them) or left-aligned (right
  padding, as the held-out loss batches have them). A batch without padding is computed row by row too: with
  several threads PyTorch's attention kernel shares out a batch's work otherwise than one row's, and a row's
  output can differ in its last digits from the same row alone; one row per call never does.
- A matrix product of a single row goes through a different kernel (matrix-vector) than two rows or more,
  which rounds differently now and then. A lone row's product is never computed alone: the serving layers
  (tuna_llm.serving.packing, on CPU) compute it twice within each call, at about the cost of once, since decoding reads
  the weights once either way; where some product is not a serving layer's (torch's own layers on a GPU, or in
  bf16 forced on a CPU without it) ``DecodeBatch`` holds the lone row twice (a ghost copy). A held-out loss
  batch of one example has as many rows as tokens.

With both, greedy answers batched and alone are the same (tuna_llm/tests/test_decoding.py, bench/evaluation.py;
measurements in docs/performance.md).
"""

from __future__ import annotations

ROWS = "tuna_rows"
_registered = False


def register() -> str:
    """Register the implementation with transformers (once per process); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ROWS, rows_attention)
        AttentionMaskInterface.register(ROWS, sdpa_mask)
        _registered = True
    return ROWS


def rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """query [rows, heads, q, dim], key/value [rows, kv_heads, k, dim]; mask None or bool [rows, 1, q, k]."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def alone(q, k, v):
        # Contiguous copies: the kernel's blocking follows the strides, so a view and a copy can round differently.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)[0]

    rows, q_length, k_length = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:  # no padding: still one call per row (a batch's call splits its work otherwise)
        return torch.cat([alone(query[row : row + 1], key[row : row + 1], value[row : row + 1]) for row in range(rows)]), None
    if attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    out = query.new_zeros((rows, q_length, query.shape[1], value.shape[-1]))
    # The last query sees every real key of its row (causal, padding masked): one run of columns, on the right
    # for left padding (a decoding batch), on the left for right padding (a held-out loss batch).
    visible = attention_mask[:, 0, -1, :]
    for row in range(rows):
        columns = visible[row].nonzero()
        if not len(columns):
            continue
        start, end = int(columns[0]), int(columns[-1]) + 1
        if q_length == k_length:  # no cache: the queries are the same positions
            q_start, q_end = start, end
        else:  # decoding on a cache: the newest queries, at the right end
            q_start, q_end = q_length - min(q_length, end - start), q_length
        keys, values = key[row : row + 1, :, start:end], value[row : row + 1, :, start:end]
        out[row, q_start:q_end] = alone(query[row : row + 1, :, q_start:q_end], keys, values)[0]
    return out, None
