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

With `share_prefix` (train.share_prefix, on with packing), a pair's chosen and rejected share
what they have in common: the prompt and the answers' common beginning (a CLAIR revision leaves
most of an answer as it was) are computed once, followed by the rest of chosen; the rest of
rejected comes after, its positions continuing from the shared part, attending to the shared part
and causally to itself. A prediction inside the shared part counts for both sequences. The
function of the weights is the same, so log-probs and gradients equal the unshared ones within
rounding, with fewer tokens computed.
"""

from __future__ import annotations

from rayalign.train.data import collate

# The attention implementation a packed forward needs (`register_packed_attention` names it to
# transformers; engine.load_model does so when it loads a model for packing).
PACKED_ATTENTION = "rayalign_packed"


def pair_logps(model, pairs: list[dict], pad_id: int, packed: bool = False, share_prefix: bool = False) -> dict:
    """Summed completion log-probs of each pair's chosen and rejected (float32 [B] each), their
    completion token counts, the real tokens in the forward (`tokens`) and the positions it
    computed (`slots`: tokens plus padding).

    Padded, only positions that can predict a completion token go through the output layer: from
    the last token of the shortest prompt on (`logits_to_keep`), which skips the prompts' share of
    the vocabulary projection and its softmax."""
    if packed:
        return _packed_logps(model, pairs, share_prefix)
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


def pack(pairs: list[dict], share_prefix: bool = False) -> dict:
    """The packed row of `pairs`: input_ids and position_ids [1, T]; `blocks` [N, 4] (int32, on
    the host), the attention blocks in row order, each (start, end, prefix start, prefix end): its
    positions attend causally among themselves and to all of the prefix (empty but where a
    rejected answer's rest follows its shared part); `keep` [K], the positions whose next token is a
    completion token, `targets` [K] those tokens, `owner` [K] the sequence each prediction counts
    for (chosen of pair i is i, rejected B + i), `twice` and `twice_owner`, the predictions that
    count for a second sequence too (inside a shared part) and that sequence, and `counts` [2B] the
    completion tokens each sequence scores. Unshared, the row is prompt+chosen of each pair, then
    prompt+rejected of each. As in the padded forward, a sequence's first token is never predicted
    (an empty prompt scores its answer from the second token on)."""
    import torch

    from rayalign.train.data import shared_prefix

    n = len(pairs)
    ids, positions, blocks, keep, targets, owner, twice, twice_owner = [], [], [], [], [], [], [], []
    counts = [0] * (2 * n)

    def predict(row: int, target: int, who: int, also: int | None = None) -> None:
        if also is not None:
            twice.append(len(keep))
            twice_owner.append(also)
        keep.append(row)
        targets.append(target)
        owner.append(who)

    if not share_prefix:
        sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + \
                    [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
        for k, (prompt, answer) in enumerate(sequences):
            start, sequence = len(ids), list(prompt) + list(answer)
            ids.extend(sequence)
            positions.extend(range(len(sequence)))
            blocks.append((start, start + len(sequence), start, start))
            first = max(len(prompt), 1) - 1
            for q in range(first, len(sequence) - 1):
                predict(start + q, sequence[q + 1], k)
            counts[k] = len(sequence) - 1 - first
    else:
        for i, pair in enumerate(pairs):
            prompt = list(pair["prompt_ids"])
            chosen, rejected = prompt + list(pair["chosen_ids"]), prompt + list(pair["rejected_ids"])
            shared = len(prompt) + shared_prefix(pair)       # chosen[:shared] == rejected[:shared]
            a = len(ids)
            ids.extend(chosen)
            positions.extend(range(len(chosen)))
            blocks.append((a, a + len(chosen), a, a))
            b = len(ids)
            if len(rejected) > shared:
                ids.extend(rejected[shared:])
                positions.extend(range(shared, len(rejected)))
                blocks.append((b, b + len(rejected) - shared, a, a + shared))
            first = max(len(prompt), 1) - 1
            for q in range(first, len(chosen) - 1):  # inside the shared part, rejected's too
                predict(a + q, chosen[q + 1], i, n + i if q <= shared - 2 else None)
            for q in range(max(first, shared - 1), len(rejected) - 1):
                predict(a + q if q < shared else b + q - shared, rejected[q + 1], n + i)
            counts[i], counts[n + i] = len(chosen) - 1 - first, len(rejected) - 1 - first
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "blocks": torch.tensor(blocks, dtype=torch.int32).reshape(-1, 4),
            "keep": torch.tensor(keep, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
            "owner": torch.tensor(owner, dtype=torch.long), "twice": torch.tensor(twice, dtype=torch.long),
            "twice_owner": torch.tensor(twice_owner, dtype=torch.long), "counts": torch.tensor(counts, dtype=torch.long)}


def _packed_logps(model, pairs: list[dict], share_prefix: bool) -> dict:
    import torch
    import torch.nn.functional as F

    row = pack(pairs, share_prefix)
    device = next(model.parameters()).device
    keep, owner = row["keep"].to(device), row["owner"].to(device)
    # The blocks stay on the host: packed_attention slices by them, with no device round trip.
    logits = model(input_ids=row["input_ids"].to(device), position_ids=row["position_ids"].to(device),
                   use_cache=False, logits_to_keep=keep, packed_blocks=row["blocks"]).logits[0]
    token_logps = -F.cross_entropy(logits.float(), row["targets"].to(device), reduction="none")
    counts = row["counts"].to(device)
    sums = torch.zeros(len(counts), dtype=torch.float32, device=device).index_add(0, owner, token_logps)
    if len(row["twice"]):
        sums = sums.index_add(0, row["twice_owner"].to(device), token_logps[row["twice"].to(device)])
    n = len(pairs)
    tokens = int(row["input_ids"].shape[1])
    return {"chosen": sums[:n], "rejected": sums[n:], "chosen_tokens": counts[:n], "rejected_tokens": counts[n:],
            "tokens": tokens, "slots": tokens}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_blocks=None, **kwargs):
    """Causal attention within each block of a packed row (transformers' attention-function
    contract: query [1, heads, T, dim], key and value [1, kv_heads, T, dim]; returns
    [1, T, heads, dim]); `packed_blocks` as `pack` makes them.

    One scaled-dot-product call per block: `is_causal` where it has no prefix, so no T x T mask is
    built and the cost is the sum of each block's square, not the square of the row; a block after
    a shared prefix attends to all of it and causally to itself (a mask of its own rows only)."""
    import torch
    import torch.nn.functional as F

    if packed_blocks is None:
        raise ValueError(f"the model was loaded for packed sequences ({PACKED_ATTENTION}) but the forward "
                         "gave no blocks: call pair_logps(..., packed=True)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    parts = []
    for start, end, prefix_start, prefix_end in packed_blocks.tolist():
        q = query[:, :, start:end]
        if prefix_end == prefix_start:
            parts.append(F.scaled_dot_product_attention(q, key[:, :, start:end], value[:, :, start:end],
                                                        dropout_p=dropout, is_causal=True, scale=scaling))
            continue
        k = torch.cat([key[:, :, prefix_start:prefix_end], key[:, :, start:end]], dim=2)
        v = torch.cat([value[:, :, prefix_start:prefix_end], value[:, :, start:end]], dim=2)
        visible = torch.ones(end - start, k.shape[2], dtype=torch.bool, device=q.device).tril(
            diagonal=prefix_end - prefix_start)
        parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout, scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
