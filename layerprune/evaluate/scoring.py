"""Log-likelihood scoring for lm-evaluation-harness that skips the work a score does not need.

lm-eval's HFLM scores a multiple-choice answer by running the whole prompt+answer through the
model and taking a full-vocabulary log-softmax at every position. Most of that is thrown away:
a 5-shot MMLU prompt is ~600 tokens, ~450 of them the subject's five examples that every one of
its questions repeats, and one position (the answer letter) is scored.

`SharedPrefixHFLM` is HFLM with `_loglikelihood_tokens` (lm-eval's scoring core, whose contract
it keeps: requests of (strings, context ids, continuation ids) in, (log p, is greedy) out) done
in three steps:

1. Rows: a request's model input is context+continuation minus its last token, left-truncated
   to max_length, exactly as in HFLM. Requests with the same input share one row (MMLU's four
   letters, BoolQ's yes/no), as in HFLM; each reads its own last positions of that row (HFLM
   0.4.13 reads the first ones when the shared requests' continuations differ in length).
2. Groups: rows sorted in token order put those with a common start next to each other. A run
   of rows whose common prefix is at least MIN_SHARED_PREFIX tokens is a group; its prefix never
   covers a scored position. The prefix runs once (batch 1) and its KV cache is copied for each
   batch of the group's suffixes. Rows that share no prefix are batched together without one.
3. Positions: `logits_to_keep` makes the model project onto the vocabulary only the positions
   that are scored, so the log-softmax is [batch, answer length, vocab], not [batch, prompt, vocab].

Suffixes are right-padded: attention is causal, so real tokens never attend to the padding that
follows them, no mask is needed, and position ids follow from the cache length. The scores equal
HFLM's up to float rounding (tests/test_scoring.py checks four architectures against it).
Models whose forward takes no `logits_to_keep`, seq2seq models and batch_size="auto" go through
HFLM unchanged.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from layerprune.method.batching import length_buckets, make_batch

# Tokens. Under this, a separate batch-1 pass for the prefix saves less than it costs; MMLU's
# shared examples are ~450 tokens, while different subjects share only their ~12-token header.
MIN_SHARED_PREFIX = 32


class SharedPrefixHFLM(HFLM):
    """HFLM that encodes each shared prompt prefix once and scores only the answer positions."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        batch_size = override_bs or self.batch_size
        params = inspect.signature(self.model.forward).parameters
        if (self.backend != "causal" or not isinstance(batch_size, int)
                or "logits_to_keep" not in params):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        # transformers 5.2x renamed `past_key_values` (argument and output field) to `cache`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

        rows: dict[tuple[int, ...], int] = {}  # model input -> row index
        users = defaultdict(list)              # row index -> requests it answers
        for i, (_, context, continuation) in enumerate(requests):
            inp = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            users[rows.setdefault(inp, len(rows))].append(i)
        seqs = list(rows)
        need = [max(len(requests[i][2]) for i in users[r]) for r in range(len(seqs))]

        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Scoring (shared prefixes, answer positions only)")
        for prefix_len, members in group_rows(seqs, need):
            prefix = self._prefix_cache(seqs[members[0]][:prefix_len]) if prefix_len else None
            suffixes = [seqs[r][prefix_len:] for r in members]
            for bucket in length_buckets(suffixes, batch_size):
                batch = [members[j] for j in bucket]
                logprobs = self._score([suffixes[j] for j in bucket],
                                       max(need[r] for r in batch), prefix)
                for r, row_logprobs in zip(batch, logprobs):
                    for i in users[r]:
                        strings, _, continuation = requests[i]
                        answers[i] = _answer(row_logprobs, continuation)
                        if strings is not None:  # loglikelihood_rolling caches per document
                            self.cache_hook.add_partial("loglikelihood", strings, answers[i])
                        bar.update(1)
        bar.close()
        return answers

    def _forward(self, ids: torch.Tensor, **kwargs):
        with torch.no_grad(), torch.autocast(device_type=self.device.type,
                                             dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(input_ids=ids, **kwargs)

    def _prefix_cache(self, prefix: tuple[int, ...]):
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        out = self._forward(ids, use_cache=True, logits_to_keep=1)
        return getattr(out, self._cache_arg)

    def _score(self, suffixes: list[tuple[int, ...]], keep: int, prefix) -> torch.Tensor:
        """Log-probs [batch, keep, vocab] at each suffix's last `keep` input positions."""
        batch = make_batch(suffixes, list(range(len(suffixes))), pad_id=0, side="right")
        # A suffix shorter than `keep` repeats position 0; `_answer` reads only its own last ones.
        positions = (batch.lengths[:, None] - keep + torch.arange(keep)).clamp(min=0)
        if prefix is None:
            kwargs = {"use_cache": False}
        else:  # each batch extends its own copy of the prefix's cache
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(suffixes))
            kwargs = {self._cache_arg: cache}
        logits = self._forward(batch.input_ids.to(self.device),
                               logits_to_keep=positions.to(self.device), **kwargs).logits
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)


def group_rows(seqs: list[tuple[int, ...]], need: list[int]) -> list[tuple[int, list[int]]]:
    """[(prefix length, row indices)]: rows sharing a prefix, then the rest with prefix 0.

    A row's prefix must leave its last `need[r]` positions (the scored ones) in the suffix.
    In token order the common prefix with a run's first row only shrinks, so one pass suffices.
    """
    order = sorted(range(len(seqs)), key=seqs.__getitem__)
    groups, alone, i = [], [], 0
    while i < len(order):
        first = seqs[order[i]]
        members, prefix_len = [order[i]], len(first) - need[order[i]]
        for r in order[i + 1:]:
            shared = min(prefix_len, _common_prefix(first, seqs[r]), len(seqs[r]) - need[r])
            if shared < MIN_SHARED_PREFIX:
                break
            members.append(r)
            prefix_len = shared
        if len(members) > 1:
            groups.append((prefix_len, members))
        else:
            alone.append(order[i])
        i += len(members)
    return groups + ([(0, alone)] if alone else [])


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _answer(row_logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p of the continuation, whether greedy decoding would produce it)."""
    scored = row_logprobs[-len(continuation):]
    target = torch.tensor(continuation, device=scored.device)
    logp = scored.gather(1, target[:, None]).sum()
    return float(logp), bool((scored.argmax(-1) == target).all())
