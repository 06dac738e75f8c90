"""``msp_synth``: a synthetic multilingual speech task shaped like Objective Soups' (ASR + ST + SSL).

Generative story (all drawn from ``numpy.random.default_rng(seed)``, nothing downloaded):

* ``languages`` source languages ``l0, l1, ...``, each with its own ``vocab`` tokens (ids 1..V;
  0 is the CTC blank). Token v of language l has an onset and an offset prototype
  ``a[l, v], b[l, v] ~ N(0, I_F)`` in R^F (F = ``features``).
* An utterance of language l has n ~ U{min_tokens..max_tokens} tokens drawn uniformly; token i
  lasts d_i ~ U{min_dur..max_dur} frames (so alignment must be learned), and its j-th frame,
  at relative position ``r = (j + 1/2) / d_i``, is
  ``x = (1 - r) a[l, v_i] + r b[l, v_i] + s + noise * e`` (a glide, so the frames of one token
  differ), with a per-utterance speaker offset ``s ~ N(0, speaker^2 I)`` and ``e ~ N(0, I)``.
* Translation to one target language (``target_vocab`` words): in each source language a
  fraction ``drop_fraction`` of the tokens are function words with no translation, a fraction
  ``modifier_fraction`` are modifiers that swap with a following content word (as adjectives do
  between French and English), and every other token maps to a target word through a random
  lexicon (several source tokens may share a target word). So the target is a reordered,
  shorter, many-to-one image of the source.

Objectives (in Jacobian-row order): ``asr_l0 .. asr_l{L-1}`` (CTC over that language's tokens,
computed on the examples of that language in the batch only), ``st`` (CTC over target words, every
example), ``ssl`` (masked contrastive prediction, below). Groups: ``asr``, ``st``, ``ssl``.

SSL objective (wav2vec 2.0-like, with the clean input frames as fixed targets, so it cannot
collapse): spans of ``mask_span`` frames starting with probability ``mask_prob`` per frame are
zeroed in the input. For a masked frame t with projected encoder output ``z_t`` and clean frames
``c_1..c_T`` of the same utterance, ``L = -log softmax_{t'}(cos(z_t, c_t') / temperature)[t]``,
averaged over the masked frames. The same masked input feeds every objective (as masking does in
wav2vec 2.0 fine-tuning), so one forward serves all. SSL wants the speaker offset and frame
detail kept in the encoder, which ASR and ST want discarded: the objectives conflict.

Metrics (held-out set, greedy CTC decoding, clean input for ASR and ST):
``asr_*``: token error rate (fraction, lower is better); ``st``: corpus BLEU-4 on word ids
(0..100, higher is better); ``ssl``: contrastive accuracy, the fraction of masked frames whose
own clean frame gets the highest score among the utterance's frames (higher is better). Chance
is about 1/T, 0.06 here; the frames of one token are alike (they differ along the glide and by
the noise), so the ceiling is well below 1: about 0.54 with the default options for a predictor
that knew every noise-free frame, and a fully masked token cannot be inferred at all.

Batches from ``batch(indices)``: a ``SpeechBatch`` of padded tensors, lengths and per-example
language ids; a batch mixes languages. When a batch holds no example of language l (or no masked
frame), that objective's loss is ``0 * (sum of its head's outputs)``: exactly zero, yet a tensor
in the graph of the parameters, so ``autograd.grad`` of it is defined (and is zero).

Model: ``encoder`` (shared, ``Task.shared == "encoder"``): conv1d(F->H, k) ReLU, then
``layers`` residual blocks ``h + ReLU(conv1d(h, k, dilation 2^i))``, then LayerNorm.
Heads: ``heads["asr_lX"]`` linear H -> V+1; ``heads["st"]`` conv1d(H->H, 3) ReLU linear
H -> target_vocab+1 (its own context for the reordering); ``heads["ssl"]`` conv1d(H->H, 3) ReLU
linear H -> F (its own context to fill in masked frames). ``model(features)`` returns all outputs
(log-probabilities for the CTC heads, the projection for ssl) in one forward call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _check_indices, _check_int, _check_real, _lookup_baselines, _seeded_init
from .base import Metric, Task
from .metrics import bleu, ctc_greedy_decode, token_error_rate

# Single-task baselines: held-out metric of each objective trained alone. Keys: the options that
# differ from their defaults (``seed`` and ``eval_batch`` aside), as sorted (name, value) pairs.
# Measured 2026-11-21 on the 2-core CPU dev machine (torch 2.13.0, 1 thread, shared with other
# jobs) by
#   python benchmarks/task_baselines.py --task msp_synth --joint [--option languages=2]
# protocol (the quickstart's budget): build_model(s), Adam lr 3e-3, 200 steps of batch 32 drawn
# with replacement, only that objective's loss back-propagated, mean over model seeds s = 0, 1, 2
# (data seed 0). Per seed, defaults: asr_l0 0.0431 0.0570 0.0456; asr_l1 0.0885 0.0839 0.0922;
# asr_l2 0.0749 0.0679 0.0601; st 16.15 11.89 10.02; ssl 0.1391 0.1283 0.1379. languages=2:
# asr_l0 0.0425 0.0470 0.0453; asr_l1 0.0801 0.0945 0.0849; st 23.59 27.06 20.59; ssl 0.1447
# 0.1609 0.1634. The equal-weight sum of all losses under the same protocol scored, defaults:
# asr 0.0979 0.1387 0.1085, st 23.44, ssl 0.1396 (Delta_m% +26.3); languages=2: asr 0.0727
# 0.1175, st 33.42, ssl 0.1603 (Delta_m% +13.6). ASR loses to sharing the encoder, ST gains.
BASELINES: dict[tuple, dict[str, float]] = {
    (): {"asr_l0": 0.0485, "asr_l1": 0.0882, "asr_l2": 0.0677, "st": 12.6848, "ssl": 0.1351},
    (("languages", 2),): {"asr_l0": 0.0449, "asr_l1": 0.0865, "st": 23.7459, "ssl": 0.1564},
}
# The plain sum of all losses (``ew``) as the project trains it: configs/quickstart.yaml with
# recipe vs, solver ew, selection all (200 steps, 2 processes x batch 16, Adam 3e-3, QSGD 4-bit
# allgather), mean over seeds 0, 1, 2; the ``msp_synth+ew`` cell of benchmarks/specs/recipes.yaml,
# measured 2026-12-02 (torch 2.13.0 CPU, 2-core VM) by
#   python benchmarks/bandwidth_accuracy.py benchmarks/specs/recipes.yaml --cells msp_synth+ew
# Per seed: asr_l0 0.0733 0.0710 0.0766; asr_l1 0.1068 0.1175 0.1137; st 33.50 36.12 28.86;
# ssl 0.1765 0.1659 0.1566. Same keys as BASELINES; the run's final table shows it as "ew ref".
EW_REFERENCE: dict[tuple, dict[str, float]] = {
    (("languages", 2),): {"asr_l0": 0.0736, "asr_l1": 0.1127, "st": 32.8264, "ssl": 0.1664},
}


@dataclass
class SpeechBatch:
    """Padded batch. B examples, T = longest utterance, S/U = longest source/target sequence.

    ``features`` (B, T, F) masked input; ``clean`` (B, T, F) unmasked frames (SSL targets);
    ``lengths`` (B,) frames; ``mask`` (B, T) bool, True where the input was zeroed;
    ``lang`` (B,) language ids; ``src`` (B, S) source token ids 1..V (0-padded), ``src_lengths``;
    ``tgt`` (B, U) target word ids 1..target_vocab (0-padded), ``tgt_lengths``.
    """

    features: torch.Tensor
    clean: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    lang: torch.Tensor
    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt: torch.Tensor
    tgt_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> SpeechBatch:
        return SpeechBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.features.shape[0]


class ConvEncoder(nn.Module):
    """Input conv, residual dilated conv blocks, LayerNorm; (B, T, F) -> (B, T, H)."""

    def __init__(self, features: int, hidden: int, layers: int, kernel: int):
        super().__init__()
        self.inp = nn.Conv1d(features, hidden, kernel, padding=kernel // 2)
        self.blocks = nn.ModuleList(
            nn.Conv1d(hidden, hidden, kernel, padding=(kernel // 2) * 2**i, dilation=2**i) for i in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x.transpose(1, 2)))
        for conv in self.blocks:
            h = h + F.relu(conv(h))
        return self.norm(h.transpose(1, 2))


class ConvHead(nn.Module):
    """A small per-objective head with its own local context: conv1d(k=3) ReLU linear."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.out = nn.Linear(hidden, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(h.transpose(1, 2))).transpose(1, 2))


class SpeechNet(nn.Module):
    """Shared ``encoder`` plus ``heads``; ``forward(features)`` returns every objective's output."""

    def __init__(
        self, languages: int, vocab: int, target_vocab: int, features: int, hidden: int, layers: int, kernel: int
    ):
        super().__init__()
        self.encoder = ConvEncoder(features, hidden, layers, kernel)
        heads: dict[str, nn.Module] = {f"asr_l{i}": nn.Linear(hidden, vocab + 1) for i in range(languages)}
        heads["st"] = ConvHead(hidden, target_vocab + 1)
        heads["ssl"] = ConvHead(hidden, features)
        self.heads = nn.ModuleDict(heads)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(features)
        out = {}
        for name, head in self.heads.items():
            y = head(h)
            out[name] = y if name == "ssl" else F.log_softmax(y, dim=-1)
        return out


def _ctc(
    log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """Mean over examples of CTC loss / target length (blank 0)."""
    return F.ctc_loss(
        log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=0, reduction="mean", zero_infinity=True
    )


def _contrastive_logits(
    z: torch.Tensor, clean: torch.Tensor, lengths: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(B, T, T) scores cos(z_t, c_t') / temperature, -inf for padded t'."""
    sim = torch.einsum("btf,bsf->bts", F.normalize(z, dim=-1), F.normalize(clean, dim=-1))
    valid = torch.arange(clean.shape[1], device=clean.device).unsqueeze(0) < lengths.unsqueeze(1)
    return (sim / temperature).masked_fill(~valid.unsqueeze(1), float("-inf"))


class MSPSynth(Task):
    """Synthetic multilingual speech: ASR per language, ST to one target language, masked SSL.

    Options (keyword, defaults): ``seed`` = 0 (data), ``languages`` = 3, ``vocab`` = 10 tokens per
    language, ``target_vocab`` = 16, ``features`` = 20, ``min_tokens`` = 4, ``max_tokens`` = 8,
    ``min_dur`` = 2, ``max_dur`` = 4 frames per token, ``noise`` = 0.8, ``speaker`` = 0.5,
    ``drop_fraction`` = 0.1, ``modifier_fraction`` = 0.3, ``n_train`` = 6000, ``n_test`` = 600,
    ``mask_prob`` = 0.08, ``mask_span`` = 2, ``temperature`` = 0.3, ``hidden`` = 64,
    ``layers`` = 2, ``kernel`` = 5, ``eval_batch`` = 600.
    """

    name = "msp_synth"
    shared = "encoder"
    # The Objective Soups orders: ASR, then ST, then SSL ("uas"), or ST first ("usa"); SSL is
    # the constraint of the vc recipe.
    level_orders = {"uas": ("asr", "st", "ssl"), "usa": ("st", "asr", "ssl")}
    constraint_group = "ssl"

    @property
    def baselines(self) -> dict[str, float]:
        """Single-task held-out metrics of every objective, from ``BASELINES``.

        Stored for the default options and for ``languages=2`` (any ``seed`` and
        ``eval_batch``); empty for other options, where the numbers would not apply: measure
        them with ``benchmarks/task_baselines.py --task msp_synth --option KEY=VALUE``.
        """
        return _lookup_baselines(self, BASELINES, {"seed", "eval_batch"})

    @property
    def ew_reference(self) -> dict[str, float]:
        """Held-out metrics of the plain sum of losses at the quickstart's budget, from
        ``EW_REFERENCE`` (stored for ``languages=2``; empty for other options)."""
        return _lookup_baselines(self, EW_REFERENCE, {"seed", "eval_batch"})

    def __init__(
        self,
        *,
        seed: int = 0,
        languages: int = 3,
        vocab: int = 10,
        target_vocab: int = 16,
        features: int = 20,
        min_tokens: int = 4,
        max_tokens: int = 8,
        min_dur: int = 2,
        max_dur: int = 4,
        noise: float = 0.8,
        speaker: float = 0.5,
        drop_fraction: float = 0.1,
        modifier_fraction: float = 0.3,
        n_train: int = 6000,
        n_test: int = 600,
        mask_prob: float = 0.08,
        mask_span: int = 2,
        temperature: float = 0.3,
        hidden: int = 64,
        layers: int = 2,
        kernel: int = 5,
        eval_batch: int = 600,
    ):
        self.seed = _check_int("seed", seed, 0)
        self.languages = _check_int("languages", languages, 1, 26)
        self.vocab = _check_int("vocab", vocab, 2)
        self.target_vocab = _check_int("target_vocab", target_vocab, 2)
        self.features = _check_int("features", features, 1)
        self.min_tokens = _check_int("min_tokens", min_tokens, 1)
        self.max_tokens = _check_int("max_tokens", max_tokens, self.min_tokens)
        # CTC needs at least as many frames as labels plus repeats: two frames per token suffice.
        self.min_dur = _check_int("min_dur", min_dur, 2)
        self.max_dur = _check_int("max_dur", max_dur, self.min_dur)
        self.noise = _check_real("noise", noise, 0.0)
        self.speaker = _check_real("speaker", speaker, 0.0)
        self.drop_fraction = _check_real("drop_fraction", drop_fraction, 0.0, 0.5)
        self.modifier_fraction = _check_real("modifier_fraction", modifier_fraction, 0.0, 0.5)
        self.n_train = _check_int("n_train", n_train, 1)
        self.n_test = _check_int("n_test", n_test, 1)
        self.mask_prob = _check_real("mask_prob", mask_prob, 0.0, 1.0)
        self.mask_span = _check_int("mask_span", mask_span, 1)
        self.temperature = _check_real("temperature", temperature, 1e-3)
        self.hidden = _check_int("hidden", hidden, 1)
        self.layers = _check_int("layers", layers, 0)
        self.kernel = _check_int("kernel", kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"option 'kernel' must be odd (same-length convolutions), got {kernel}")
        self.eval_batch = _check_int("eval_batch", eval_batch, 1)

        self.lang_names = tuple(f"l{i}" for i in range(self.languages))
        asr = tuple(f"asr_{n}" for n in self.lang_names)
        self.objectives = asr + ("st", "ssl")
        self.groups = {"asr": asr, "st": ("st",), "ssl": ("ssl",)}
        self.metrics = {k: Metric("token_error_rate", higher_is_better=False) for k in asr}
        self.metrics["st"] = Metric("bleu", higher_is_better=True)
        self.metrics["ssl"] = Metric("contrastive_accuracy", higher_is_better=True)

        rng = np.random.default_rng(self.seed)
        self._make_languages(rng)
        self._train = self._make_split(rng, self.n_train)
        self._test = self._make_split(rng, self.n_test)
        # Fixed masks for the held-out SSL accuracy, so evaluation is deterministic.
        self._test_mask = self._draw_mask(rng, self._test["lengths"])

    # ----------------------------------------------------------------- data generation
    def _make_languages(self, rng: np.random.Generator) -> None:
        L, V = self.languages, self.vocab
        # Onset and offset prototype of every token; id 0 is the blank, never spoken.
        self.prototypes = rng.standard_normal((L, V + 1, 2, self.features)).astype(np.float32)
        self.prototypes[:, 0] = 0.0
        # Word class of every source token: 0 content word, 1 modifier, 2 function word (dropped).
        self.word_class = np.zeros((L, V + 1), dtype=np.int64)
        self.lexicon = np.zeros((L, V + 1), dtype=np.int64)
        n_drop = int(round(self.drop_fraction * V))
        n_mod = int(round(self.modifier_fraction * V))
        for lang in range(L):
            perm = rng.permutation(np.arange(1, V + 1))
            self.word_class[lang, perm[:n_drop]] = 2
            self.word_class[lang, perm[n_drop : n_drop + n_mod]] = 1
            self.lexicon[lang, 1:] = rng.integers(1, self.target_vocab + 1, size=V)
            self.lexicon[lang, self.word_class[lang] == 2] = 0

    def translate(self, lang: int, src: list[int]) -> list[int]:
        """Target word ids of source tokens ``src`` of language ``lang`` (lexicon + reordering)."""
        cls, lex = self.word_class[lang], self.lexicon[lang]
        out: list[int] = []
        i = 0
        while i < len(src):
            v = src[i]
            if cls[v] == 1 and i + 1 < len(src) and cls[src[i + 1]] == 0:
                out += [int(lex[src[i + 1]]), int(lex[v])]  # modifier + content word -> swapped
                i += 2
                continue
            if cls[v] != 2:
                out.append(int(lex[v]))
            i += 1
        return out

    def _make_split(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        T = self.max_tokens * self.max_dur
        S = self.max_tokens
        frames = np.zeros((n, T, self.features), dtype=np.float32)
        lengths = np.zeros(n, dtype=np.int64)
        lang = rng.integers(0, self.languages, size=n)
        src = np.zeros((n, S), dtype=np.int64)
        src_len = rng.integers(self.min_tokens, self.max_tokens + 1, size=n)
        tgt = np.zeros((n, S), dtype=np.int64)
        tgt_len = np.zeros(n, dtype=np.int64)
        for i in range(n):
            toks = rng.integers(1, self.vocab + 1, size=src_len[i])
            dur = rng.integers(self.min_dur, self.max_dur + 1, size=src_len[i])
            seq = np.repeat(toks, dur)
            t = len(seq)
            # Position of each frame inside its token, in (0, 1): the sound glides from the
            # token's onset to its offset prototype, so frames of one token are not duplicates.
            pos = np.concatenate([(np.arange(d) + 0.5) / d for d in dur])[:, None]
            proto = self.prototypes[lang[i], seq]
            offset = self.speaker * rng.standard_normal(self.features)
            frames[i, :t] = (
                (1.0 - pos) * proto[:, 0]
                + pos * proto[:, 1]
                + offset
                + self.noise * rng.standard_normal((t, self.features))
            )
            lengths[i] = t
            src[i, : len(toks)] = toks
            out = self.translate(int(lang[i]), toks.tolist())
            tgt[i, : len(out)] = out
            tgt_len[i] = len(out)
        return {
            "frames": torch.from_numpy(frames),
            "lengths": torch.from_numpy(lengths),
            "lang": torch.from_numpy(lang.astype(np.int64)),
            "src": torch.from_numpy(src),
            "src_lengths": torch.from_numpy(src_len.astype(np.int64)),
            "tgt": torch.from_numpy(tgt),
            "tgt_lengths": torch.from_numpy(tgt_len),
        }

    def _draw_mask(self, rng: np.random.Generator, lengths: torch.Tensor) -> torch.Tensor:
        """Span mask (B, T): starts with prob mask_prob, each covering mask_span frames."""
        b, t = len(lengths), int(lengths.max())
        starts = rng.random((b, t)) < self.mask_prob
        mask = starts.copy()
        for k in range(1, self.mask_span):
            mask[:, k:] |= starts[:, :-k]
        mask = torch.from_numpy(mask)
        return mask & (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1))

    def _gather(self, split: dict[str, torch.Tensor], idx: torch.Tensor, mask: torch.Tensor) -> SpeechBatch:
        lengths = split["lengths"][idx]
        t = int(lengths.max())
        s = max(int(split["src_lengths"][idx].max()), 1)
        u = max(int(split["tgt_lengths"][idx].max()), 1)
        clean = split["frames"][idx, :t]
        mask = mask[:, :t]
        features = clean.masked_fill(mask.unsqueeze(-1), 0.0)
        return SpeechBatch(
            features=features,
            clean=clean,
            lengths=lengths,
            mask=mask,
            lang=split["lang"][idx],
            src=split["src"][idx, :s],
            src_lengths=split["src_lengths"][idx],
            tgt=split["tgt"][idx, :u],
            tgt_lengths=split["tgt_lengths"][idx],
        )

    # ----------------------------------------------------------------- Task interface
    def build_model(self, seed: int) -> SpeechNet:
        return _seeded_init(
            seed,
            lambda: SpeechNet(
                self.languages, self.vocab, self.target_vocab, self.features, self.hidden, self.layers, self.kernel
            ),
        )

    def train_size(self) -> int:
        return self.n_train

    def batch(self, indices: torch.Tensor) -> SpeechBatch:
        """Examples ``indices``; the SSL mask is seeded by (seed, indices), so it is reproducible
        on every rank and after resume yet differs between batches."""
        idx = _check_indices(indices, self.n_train)
        rng = np.random.default_rng([self.seed, 0x55AA] + idx.tolist())
        return self._gather(self._train, idx, self._draw_mask(rng, self._train["lengths"][idx]))

    def losses(self, model: nn.Module, batch: SpeechBatch) -> dict[str, torch.Tensor]:
        out = model(batch.features)
        losses: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.lang_names):
            lp = out[f"asr_{name}"]
            sel = batch.lang == i
            if bool(sel.any()):
                losses[f"asr_{name}"] = _ctc(lp[sel], batch.lengths[sel], batch.src[sel], batch.src_lengths[sel])
            else:  # no example of this language: zero, but still a function of the parameters
                losses[f"asr_{name}"] = 0.0 * lp.sum()
        losses["st"] = _ctc(out["st"], batch.lengths, batch.tgt, batch.tgt_lengths)
        z = out["ssl"]
        if bool(batch.mask.any()):
            logits = _contrastive_logits(z, batch.clean, batch.lengths, self.temperature)
            b, t = batch.mask.nonzero(as_tuple=True)
            losses["ssl"] = F.cross_entropy(logits[b, t], t)
        else:
            losses["ssl"] = 0.0 * z.sum()
        return losses

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        refs: dict[int, list[list[int]]] = {i: [] for i in range(self.languages)}
        hyps: dict[int, list[list[int]]] = {i: [] for i in range(self.languages)}
        st_refs: list[list[int]] = []
        st_hyps: list[list[int]] = []
        hits = 0
        masked = 0
        try:
            for lo in range(0, self.n_test, self.eval_batch):
                idx = torch.arange(lo, min(lo + self.eval_batch, self.n_test))
                b = self._gather(self._test, idx, self._test_mask[idx]).to(device)
                out = model(b.clean)  # ASR and ST are scored on clean input
                lang = b.lang.cpu()
                for i, name in enumerate(self.lang_names):
                    sel = (lang == i).nonzero(as_tuple=True)[0].tolist()
                    if not sel:
                        continue
                    dec = ctc_greedy_decode(out[f"asr_{name}"][sel], b.lengths[sel])
                    hyps[i] += dec
                    refs[i] += [b.src[j, : b.src_lengths[j]].tolist() for j in sel]
                st_hyps += ctc_greedy_decode(out["st"], b.lengths)
                st_refs += [b.tgt[j, : b.tgt_lengths[j]].tolist() for j in range(len(b))]
                z = model(b.features)["ssl"]  # SSL is scored on the masked input
                logits = _contrastive_logits(z, b.clean, b.lengths, self.temperature)
                bi, ti = b.mask.nonzero(as_tuple=True)
                hits += int((logits[bi, ti].argmax(dim=-1) == ti).sum())
                masked += len(ti)
        finally:
            model.train(was_training)
        result = {}
        for i, name in enumerate(self.lang_names):
            # A language absent from a tiny test set scores as all-wrong rather than crashing.
            result[f"asr_{name}"] = token_error_rate(refs[i], hyps[i]) if refs[i] else 1.0
        result["st"] = bleu(st_refs, st_hyps)
        result["ssl"] = hits / masked if masked else 0.0
        return result
