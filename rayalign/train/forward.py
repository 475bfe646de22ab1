"""One forward of chosen and rejected through a causal LM, as summed log-probs: padded or packed.

The policy step, the on-the-fly reference and the Ray Data reference pass all call this, so
the reference log-probs are computed exactly as the policy's are.

Padded (`pair_logps(..., packed=False)`): rows 0..B-1 are prompt+chosen and rows B..2B-1
prompt+rejected, right-padded to the longest.

Packed (`packed=True`, train.packing): all 2B sequences in one row without padding, position
ids restarting at 0 for each, and attention confined to each sequence by `packed_attention`, which
the model must have been loaded with (`attn_implementation=PACKED_ATTENTION`, see
`engine.load_model`). Only the positions that predict a completion token go through the output
layer. Per-sequence log-probs equal the padded ones within fp32 rounding (the tests bound them).
"""

from __future__ import annotations

from rayalign.train.data import collate

# The attention implementation a packed forward needs (`register_packed_attention` names it to
# transformers; engine.load_model does so when it loads a model for packing).
PACKED_ATTENTION = "rayalign_packed"


def pair_logps(model, pairs: list[dict], pad_id: int, packed: bool = False) -> dict:
    """Summed completion log-probs of each pair's chosen and rejected (float32 [B] each), their
    completion token counts, the real tokens in the forward (`tokens`) and the positions it
    computed (`slots`: tokens plus padding).

    Padded, only positions that can predict a completion token go through the output layer: from
    the last token of the shortest prompt on (`logits_to_keep`), which skips the prompts' share of
    the vocabulary projection and its softmax."""
    if packed:
        return _packed_logps(model, pairs)
    from rayalign.train.losses import sequence_logps

    batch = collate(pairs, pad_id)
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    start = max(min(len(p["prompt_ids"]) for p in pairs) - 1, 0)
    width = input_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=width - start).logits
    logps, counts = sequence_logps(logits, input_ids[:, start:], batch["completion_mask"][:, start:].to(device))
    n = len(pairs)
    return {"chosen": logps[:n], "rejected": logps[n:], "chosen_tokens": counts[:n],
            "rejected_tokens": counts[n:], "tokens": int(batch["attention_mask"].sum()),
            "slots": int(input_ids.numel())}


def pack(pairs: list[dict]) -> dict:
    """The packed row of `pairs` (prompt+chosen of each pair, then prompt+rejected of each):
    input_ids and position_ids [1, T]; `bounds` [2B + 1] where each sequence starts and ends
    (int32, on the host); `keep` [K], the positions whose next token is a completion token,
    `targets` [K] those tokens, `owner` [K] the sequence each belongs to and `counts` [2B] the
    completion tokens each sequence scores. As in the padded
    forward, a sequence's first token is never predicted (an empty prompt scores its answer from
    the second token on)."""
    import torch

    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    ids, positions, bounds, keep, owner, counts = [], [], [0], [], [], []
    for k, (prompt, answer) in enumerate(sequences):
        start, length = len(ids), len(prompt) + len(answer)
        ids.extend(prompt)
        ids.extend(answer)
        positions.extend(range(length))
        bounds.append(start + length)
        first = start + max(len(prompt), 1) - 1
        keep.extend(range(first, start + length - 1))
        owner.extend([k] * (start + length - 1 - first))
        counts.append(start + length - 1 - first)
    input_ids = torch.tensor([ids], dtype=torch.long)
    keep = torch.tensor(keep, dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": torch.tensor([positions], dtype=torch.long),
            "bounds": torch.tensor(bounds, dtype=torch.int32), "keep": keep, "targets": input_ids[0, keep + 1],
            "owner": torch.tensor(owner, dtype=torch.long), "counts": torch.tensor(counts, dtype=torch.long)}


def _packed_logps(model, pairs: list[dict]) -> dict:
    import torch
    import torch.nn.functional as F

    row = pack(pairs)
    device = next(model.parameters()).device
    keep, owner = row["keep"].to(device), row["owner"].to(device)
    # The bounds stay on the host: packed_attention slices by them, with no device round trip.
    logits = model(input_ids=row["input_ids"].to(device), position_ids=row["position_ids"].to(device),
                   use_cache=False, logits_to_keep=keep, cu_seq_lens_q=row["bounds"]).logits[0]
    token_logps = -F.cross_entropy(logits.float(), row["targets"].to(device), reduction="none")
    counts = row["counts"].to(device)
    sums = torch.zeros(len(counts), dtype=torch.float32, device=device).index_add(0, owner, token_logps)
    n = len(pairs)
    tokens = int(row["input_ids"].shape[1])
    return {"chosen": sums[:n], "rejected": sums[n:], "chosen_tokens": counts[:n], "rejected_tokens": counts[n:],
            "tokens": tokens, "slots": tokens}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     cu_seq_lens_q=None, **kwargs):
    """Causal attention within each packed sequence (transformers' attention-function contract:
    query [1, heads, T, dim], key and value [1, kv_heads, T, dim]; returns [1, T, heads, dim]).

    One scaled-dot-product call per sequence with `is_causal`, so no T x T mask is built and the
    cost is the sum of each sequence's square, as padded, not the square of the row."""
    import torch
    import torch.nn.functional as F

    if cu_seq_lens_q is None:
        raise ValueError(f"the model was loaded for packed sequences ({PACKED_ATTENTION}) but the forward "
                         "gave no sequence bounds: call pair_logps(..., packed=True)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens_q.tolist()
    dropout = dropout if module.training else 0.0
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                            is_causal=True, scale=scaling)
             for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
