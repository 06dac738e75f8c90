"""Sequence metrics for the built-in tasks: edit distance, token error rate, corpus BLEU, CTC decoding.

All functions work on token ids (plain Python ints), so they apply to any vocabulary.

* ``edit_distance(ref, hyp)``: Levenshtein distance, the fewest substitutions, insertions and
  deletions turning ``hyp`` into ``ref``.
* ``token_error_rate(refs, hyps) = sum_i d(ref_i, hyp_i) / sum_i |ref_i|`` (corpus level, a
  fraction: 0 is perfect, it can exceed 1 when the hypotheses are much longer than the
  references). This is WER/CER with tokens in place of words/characters.
* ``bleu(refs, hyps)``: corpus BLEU-N (Papineni et al. 2002), in [0, 100]:
  ``BLEU = BP * exp((1/N) sum_n log p_n)`` with clipped n-gram precisions
  ``p_n = sum_i sum_g min(c_hyp_i(g), c_ref_i(g)) / sum_i max(|hyp_i| - n + 1, 0)`` and brevity
  penalty ``BP = 1 if c > r else exp(1 - r/c)`` for total hypothesis length c and total reference
  length r. Unsmoothed by default (any p_n = 0 gives BLEU 0, as in sacreBLEU with no smoothing);
  ``smooth=True`` adds one to the numerator and denominator of p_n for n >= 2 (Lin and Och 2004).
* ``ctc_greedy_decode(logits, lengths)``: best-path decoding: argmax per frame, merge repeated
  labels, drop blanks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch


def _check_pairs(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]], what: str) -> None:
    if len(refs) != len(hyps):
        raise ValueError(
            f"{what}: refs and hyps must have the same number of sequences, got {len(refs)} refs and {len(hyps)} hyps"
        )


def edit_distance(ref: Sequence[int], hyp: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (unit costs), O(|ref| |hyp|) time."""
    ref = list(ref)
    hyp = list(hyp)
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    # One row of the DP table at a time: prev[j] = d(ref[:i-1], hyp[:j]).
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(
                prev[j] + 1,  # delete r
                cur[j - 1] + 1,  # insert h
                prev[j - 1] + (r != h),
            )  # substitute (or match)
        prev = cur
    return prev[-1]


def token_error_rate(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
    """Corpus token error rate: total edit distance over total reference length (a fraction)."""
    _check_pairs(refs, hyps, "token_error_rate")
    total_ref = sum(len(r) for r in refs)
    if total_ref == 0:
        raise ValueError("token_error_rate: the references are all empty, the rate is undefined")
    errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    return errors / total_ref


def _ngrams(seq: Sequence[int], n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def bleu(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]], max_n: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU-``max_n`` with one reference per hypothesis, on a 0..100 scale."""
    _check_pairs(refs, hyps, "bleu")
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"bleu: max_n must be a positive int, got {max_n!r}")
    matches = [0] * max_n
    totals = [0] * max_n
    ref_len = 0
    hyp_len = 0
    for ref, hyp in zip(refs, hyps):
        ref = list(ref)
        hyp = list(hyp)
        ref_len += len(ref)
        hyp_len += len(hyp)
        for n in range(1, max_n + 1):
            h = _ngrams(hyp, n)
            r = _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        num, den = matches[n], totals[n]
        if smooth and n > 0:
            num, den = num + 1, den + 1
        if num == 0 or den == 0:
            return 0.0
        log_p += math.log(num / den)
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * bp * math.exp(log_p / max_n)


def ctc_greedy_decode(
    logits: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None, blank: int = 0
) -> list[list[int]]:
    """Best-path CTC decoding of batch-first scores ``logits`` (B, T, C).

    Frame t of example b counts only if ``t < lengths[b]`` (all frames when ``lengths`` is None).
    The label path ``argmax_c logits[b, t, c]`` is collapsed (consecutive repeats merged) and
    then the blanks are removed, so ``a a - a b b`` decodes to ``a a b``.
    """
    if logits.dim() != 3:
        raise ValueError(f"ctc_greedy_decode: logits must be (B, T, C), got shape {tuple(logits.shape)}")
    b, t, c = logits.shape
    if not 0 <= blank < c:
        raise ValueError(f"ctc_greedy_decode: blank={blank} outside the {c} classes")
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > t).any()):
        raise ValueError(f"ctc_greedy_decode: lengths must be {b} values in [0, {t}], got {lengths.tolist()}")
    best = logits.detach().argmax(dim=-1).cpu()  # (B, T)
    # A frame emits its label when it is not blank and differs from the previous frame's label.
    prev = torch.cat([torch.full((b, 1), -1, dtype=best.dtype), best[:, :-1]], dim=1)
    keep = (best != blank) & (best != prev)
    keep &= torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return [best[i][keep[i]].tolist() for i in range(b)]
