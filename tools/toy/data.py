"""Training examples for the toy model: token ids plus (soft) targets per position.

An :class:`Example` is a prompt, a continuation, and optionally soft targets inside
the prompt. The prompt and the continuation are tokenised separately and joined
(exactly what an evaluation sees: the prompt alone, then the answer), and an
end-of-text token closes the continuation so that generation stops.

Targets are stored as a distribution over at most ``K`` token ids per position:
a hard target is ``[(id, 1.0)]``; a Bayes draw is ``[(" X", p), (" Y", 1 - p)]``
with ``p`` the exact posterior predictive. The loss is the cross-entropy against
that distribution, so a soft target teaches the probability itself, not a sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

K = 2  # max alternatives per soft target


@dataclass
class Example:
    prompt: str
    continuation: str = ""
    # soft targets inside the prompt: (char index where the target token starts,
    # {token string: probability}); the token string must be a single token.
    soft: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    family: str = ""
    eos: bool = True


@dataclass
class Encoded:
    ids: np.ndarray  # int32 (T,)
    tgt_pos: np.ndarray  # int32 (N,): position whose logits predict the target
    tgt_ids: np.ndarray  # int32 (N, K)
    tgt_p: np.ndarray  # float32 (N, K)
    family: int
    weight: float = 1.0  # loss weight of each of its targets (set by the trainer)


def encode_example(ex: Example, tokenizer, family_index: int, token_ids: dict[str, int]) -> Encoded:
    """Tokenise one example; ``token_ids`` caches single-token strings -> id."""
    enc = tokenizer(ex.prompt, add_special_tokens=False, return_offsets_mapping=True)
    p_ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    c_ids = (
        list(tokenizer.encode(ex.continuation, add_special_tokens=False))
        if ex.continuation
        else []
    )
    if ex.eos and ex.continuation:
        c_ids.append(tokenizer.eos_token_id)
    ids = p_ids + c_ids
    pos: list[int] = []
    tids: list[list[int]] = []
    tps: list[list[float]] = []
    if ex.soft:
        start_to_index = {}
        for i, (s, _e) in enumerate(offsets):
            # byte-level offsets of a token with a leading space start at the space
            start_to_index.setdefault(s, i)
        for char_idx, dist in ex.soft:
            ti = start_to_index.get(char_idx)
            if ti is None or ti == 0:
                raise ValueError(
                    f"soft target at char {char_idx} of {ex.prompt!r} is not at a token start"
                )
            ids_here, ps = [], []
            for s, p in dist.items():
                if s not in token_ids:
                    one = tokenizer.encode(s, add_special_tokens=False)
                    if len(one) != 1:
                        raise ValueError(f"soft target {s!r} is not one token")
                    token_ids[s] = one[0]
                ids_here.append(token_ids[s])
                ps.append(float(p))
            if p_ids[ti] not in ids_here:
                raise ValueError(f"token at char {char_idx} of {ex.prompt!r} is not in {dist}")
            pos.append(ti - 1)
            tids.append(ids_here)
            tps.append(ps)
    for j in range(len(c_ids)):
        t = len(p_ids) + j
        pos.append(t - 1)
        tids.append([ids[t]])
        tps.append([1.0])
    n = len(pos)
    tgt_ids = np.zeros((n, K), dtype=np.int32)
    tgt_p = np.zeros((n, K), dtype=np.float32)
    for r, (a, b) in enumerate(zip(tids, tps, strict=True)):
        tgt_ids[r, : len(a)] = a
        tgt_p[r, : len(b)] = b
    return Encoded(
        ids=np.asarray(ids, dtype=np.int32),
        tgt_pos=np.asarray(pos, dtype=np.int32),
        tgt_ids=tgt_ids,
        tgt_p=tgt_p,
        family=family_index,
    )


def collate(batch: list[Encoded], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, and flat target tensors
    (batch index, position, K ids, K probabilities, family per target)."""
    import torch

    T = max(len(e.ids) for e in batch)
    B = len(batch)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    bi, tp, ti, tpp, fam = [], [], [], [], []
    for b, e in enumerate(batch):
        ids[b, : len(e.ids)] = e.ids
        mask[b, : len(e.ids)] = 1
        bi.append(np.full(len(e.tgt_pos), b, dtype=np.int64))
        tp.append(e.tgt_pos.astype(np.int64))
        ti.append(e.tgt_ids.astype(np.int64))
        tpp.append(e.tgt_p)
        fam.append(np.full(len(e.tgt_pos), e.family, dtype=np.int64))
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "b": torch.from_numpy(np.concatenate(bi)),
        "t": torch.from_numpy(np.concatenate(tp)),
        "tgt_ids": torch.from_numpy(np.concatenate(ti)),
        "tgt_p": torch.from_numpy(np.concatenate(tpp)),
        "family": torch.from_numpy(np.concatenate(fam)),
    }
