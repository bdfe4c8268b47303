"""Next-token loss: the token-weighted mean cross-entropy over held-out text (the paper's C4 curve).

Each record is scored on its own (no packing across records): the loss sums -log p(t_i | t_<i)
over positions 1..len-1 of every record and divides by the number of such tokens. Batches are
bucketed by length and right-padded; padded positions are masked out, so the batch size never
changes the result. `loss_metrics` adds bits per byte, which does not depend on the tokenizer.

The standard error treats records (not tokens) as the independent units: tokens of one record
are correlated, records are drawn independently. The loss is a ratio of two sums over records
(nats / tokens), so its stderr is the ratio estimator's, see `ratio_stderr`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerprune.method.batching import batches, pad_token_id
from layerprune.models.placement import input_device


@torch.inference_mode()
def next_token_loss(model, tokenizer, ids: list[list[int]], batch_size: int = 8,
                    progress=None, show_bar: bool = True) -> dict:
    """{"loss": mean nats per predicted token, "tokens": predicted tokens, "stderr": the loss's
    standard error over records (`ratio_stderr`; None for fewer than two records)}."""
    device = input_device(model)
    nats, tokens = [0.0] * len(ids), [0] * len(ids)  # per record, in the order of `ids`
    done = 0
    bar = tqdm(total=len(ids), desc="loss", unit="sample", disable=not show_bar)
    for batch in batches(ids, batch_size, pad_token_id(tokenizer), "right", device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        per_token = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                    ignore_index=-100, reduction="none")  # 0 where ignored
        row_nats = per_token.view(targets.shape).double().sum(1).tolist()
        row_tokens = (targets != -100).sum(1).tolist()
        for j, r in enumerate(batch.rows):
            nats[r], tokens[r] = row_nats[j], int(row_tokens[j])
        done += len(batch.rows)
        bar.update(len(batch.rows))
        if progress:
            progress(done, len(ids))
    bar.close()
    count = sum(tokens)
    if count == 0:
        raise ValueError("loss: every record is a single token; nothing to predict")
    return {"loss": sum(nats) / count, "tokens": count, "stderr": ratio_stderr(nats, tokens)}


def ratio_stderr(sums: list[float], weights: list[int]) -> float | None:
    """Standard error of the ratio sum(sums) / sum(weights), the units (records) independent.

    With x_i = sums[i] / weights[i] (record i's mean loss), w_i = weights[i] (its predicted
    tokens), n records and xbar = sum(w_i x_i) / sum(w_i) (the token-weighted mean loss):

        stderr = sqrt(sum_i w_i^2 (x_i - xbar)^2) / sum_i w_i * sqrt(n / (n - 1))

    the delta-method (linearised) variance of a ratio estimator, with the n/(n-1) small-sample
    correction; for equal weights it is the usual sample sd / sqrt(n). Records with no predicted
    token carry no weight and do not count in n. None when fewer than two records count.
    """
    units = [(s, w) for s, w in zip(sums, weights) if w > 0]
    n = len(units)
    if n < 2:
        return None
    total_w = sum(w for _, w in units)
    xbar = sum(s for s, _ in units) / total_w
    # w_i (x_i - xbar) = s_i - w_i xbar: no division by each record's own weight needed
    spread = sum((s - w * xbar) ** 2 for s, w in units)
    return math.sqrt(spread) / total_w * math.sqrt(n / (n - 1))


def loss_metrics(model, tokenizer, source: str, seq_len: int, samples: int | None,
                 batch_size: int, text_field: str = "text") -> dict:
    """Next-token loss over the first `samples` records of `source`, and bits per byte.

    loss: total nats / predicted tokens (`next_token_loss`: every token of a record but its
    first is predicted from the ones before it; records are scored separately, truncated to
    their first `seq_len` tokens).
    bits_per_byte: the same total nats / ln(2) / the UTF-8 bytes of the text those predicted
    tokens spell (each record's text from the start of its second token to the end of its last
    kept token). Unlike loss it does not depend on the tokenizer, so models with different
    vocabularies compare.
    """
    from layerprune.method.calibration import tokenize
    from layerprune.method.data import read_records

    texts = read_records(source, limit=samples, text_field=text_field)
    ids = tokenize(texts, tokenizer, seq_len)
    res = next_token_loss(model, tokenizer, ids, batch_size, show_bar=False)
    nats = res["loss"] * res["tokens"]
    n_bytes = sum(predicted_bytes(text, row, tokenizer) for text, row in zip(texts, ids))
    vocab = model.get_output_embeddings().out_features
    return {"value": res["loss"], "stderr": res["stderr"], "n": len(ids), "metric": "loss",
            "baseline": math.log(vocab), "tokens": res["tokens"], "bytes": n_bytes,
            "bits_per_byte": nats / math.log(2) / n_bytes, "data": source, "seq_len": seq_len,
            "truncated": truncated_records(texts, ids, tokenizer, seq_len)}


def truncated_records(texts: list[str], ids: list[list[int]], tokenizer, seq_len: int) -> int:
    """How many records were longer than `seq_len` tokens and were scored on their first
    `seq_len` only (`ids` holds each record's kept tokens). Stated in every loss result: a
    record longer than the model's context is cut, never refused, since `seq_len` itself may
    not exceed the context (`models.check_context`)."""
    return sum(1 for text, row in zip(texts, ids)
               if len(row) == seq_len and len(tokenizer(text)["input_ids"]) > seq_len)


def predicted_bytes(text: str, ids: list[int], tokenizer) -> int:
    """UTF-8 bytes of the part of `text` spelled by ids[1:] (the tokens the loss predicts).

    `ids` must be the first len(ids) tokens of `tokenizer(text)`. Fast tokenizers give each
    token's character span; others fall back to decoding the predicted tokens.
    """
    if len(ids) < 2:
        return 0
    if getattr(tokenizer, "is_fast", False):
        spans = tokenizer(text, return_offsets_mapping=True)["offset_mapping"][1:len(ids)]
        real = [(a, b) for a, b in spans if b > a]  # special tokens have empty spans
        if not real:
            return 0
        return len(text[real[0][0]:max(b for _, b in real)].encode("utf-8"))
    return len(tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
