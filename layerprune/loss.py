"""Next-token loss: the token-weighted mean cross-entropy over held-out text (the paper's C4 curve).

Each record is scored on its own (no packing across records): the loss sums -log p(t_i | t_<i)
over positions 1..len-1 of every record and divides by the number of such tokens. Batches are
bucketed by length and right-padded; padded positions are masked out, so the batch size never
changes the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerprune.batching import batches, pad_token_id


@torch.inference_mode()
def next_token_loss(model, tokenizer, ids: list[list[int]], batch_size: int = 8,
                    progress=None, show_bar: bool = True) -> dict:
    """{"loss": mean nats per predicted token, "tokens": predicted tokens, "bytes": None}."""
    device = next(model.parameters()).device
    total, count, done = 0.0, 0, 0
    bar = tqdm(total=len(ids), desc="loss", unit="sample", disable=not show_bar)
    for batch in batches(ids, batch_size, pad_token_id(tokenizer), "right", device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                 ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
        done += len(batch.rows)
        bar.update(len(batch.rows))
        if progress:
            progress(done, len(ids))
    bar.close()
    if count == 0:
        raise ValueError("loss: every record is a single token; nothing to predict")
    return {"loss": total / count, "tokens": count}
