"""One concatenated forward of chosen and rejected through a causal LM, as summed log-probs.

The policy step, the on-the-fly reference and the Ray Data reference pass all call this, so
the reference log-probs are computed exactly as the policy's are.
"""

from __future__ import annotations

from rayalign.train.data import collate
from rayalign.train.losses import sequence_logps


def pair_logps(model, pairs: list[dict], pad_id: int) -> dict:
    """Summed completion log-probs of each pair's chosen and rejected (float32 [B] each), their
    completion token counts, and the number of real (non-pad) tokens in the forward.

    Only positions that can predict a completion token go through the output layer: from the
    last token of the shortest prompt on (`logits_to_keep`), which skips the prompts' share of
    the vocabulary projection and its softmax."""
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
            "rejected_tokens": counts[n:], "tokens": int(batch["attention_mask"].sum())}
