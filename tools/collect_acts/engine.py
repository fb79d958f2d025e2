"""The work of dolm-collect-acts: plan every prompt, then run batches and score them.

``plan_items`` checks the whole (shard of the) prompts table before any forward pass:
token lengths against the model's context, single-token choices, named spans for
``--positions`` and ``--attention-to``. ``score_batch`` runs one right-padded forward
pass over prompt + target tokens (teacher forcing) with hooks on the requested sites and
turns it into outcome rows and activation rows. Because padding is on the right and the
model is causal, every number for a prompt is the same as in a batch of one (up to float
rounding of batched matmuls).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dolm.errors import InputError
from dolm.metrics import is_missing
from dolm_tools.collect_acts import positions as pos

ENCODE_CHUNK = 256


@dataclass
class Settings:
    """What to compute (everything that changes the outputs; batch size does not)."""

    sites: list[str] = field(default_factory=list)  # concrete site names
    positions: list[str] = field(default_factory=lambda: ["last"])
    act_dtype: str = "float32"
    generate: int = 0
    attention_to: list[str] = field(default_factory=list)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "sites": list(self.sites),
            "positions": list(self.positions) if self.sites else None,
            "act_dtype": self.act_dtype if self.sites else None,
            "generate": self.generate,
            "attention_to": list(self.attention_to),
        }


@dataclass
class Item:
    """One prompt, tokenised and checked."""

    index: int  # row in the full prompts table
    prompt_id: str
    ids: np.ndarray  # prompt token ids
    target: str | None
    target_ids: np.ndarray | None
    choice_ids: np.ndarray | None
    family: str | None
    act_pos: np.ndarray  # token positions to store, in --positions order
    act_label: list[str]
    attn_pos: dict[str, np.ndarray]  # span -> token positions (--attention-to)

    @property
    def n(self) -> int:
        return int(len(self.ids))

    @property
    def n_target(self) -> int:
        return 0 if self.target_ids is None else int(len(self.target_ids))


# ---------------------------------------------------------------- planning


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a continuation (``" X"``) on its own, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def target_ids_batch(
    tokenizer: Any, prompts: list[str], targets: list[str | None], prompt_ids: list[list[int]]
) -> list[list[int] | None]:
    """The target's tokens as they follow the prompt (teacher forcing on prompt + target).

    ``prompt + target`` is tokenised as one text and the part after the prompt's tokens
    taken, so tokenizers that mark word starts (SentencePiece) give the in-context
    tokens; where the joint tokens do not start with the prompt's own (a merge across the
    boundary), the target is tokenised on its own.
    """
    todo = [k for k, t in enumerate(targets) if t]
    out: list[list[int] | None] = [None] * len(targets)
    if not todo:
        return out
    joint = tokenizer([prompts[k] + targets[k] for k in todo], add_special_tokens=False)
    for k, ids in zip(todo, joint["input_ids"], strict=True):
        p = prompt_ids[k]
        ids = list(ids)
        if len(ids) > len(p) and ids[: len(p)] == p:
            out[k] = ids[len(p) :]
        else:
            out[k] = continuation_ids(tokenizer, targets[k])
    return out


def plan_items(
    df: Any, lm: Any, settings: Settings, where: str, first_index: int = 0
) -> list[Item]:
    """Tokenise and check every prompt of ``df``; InputError names the prompt at fault."""
    cols = set(df.columns)
    for col in ("prompt_id", "prompt"):
        if col not in cols:
            raise InputError(f"{where}: missing required column {col!r}")
    need_spans = pos.needs_spans(settings.positions) and bool(settings.sites)
    need_spans = need_spans or bool(settings.attention_to)
    if need_spans and "spans" not in cols:
        what = "--attention-to" if settings.attention_to else "--positions"
        raise InputError(
            f"{where}: {what} names a span, but the table has no 'spans' column "
            "(expected a JSON object name -> [char_start, char_end) per prompt)"
        )
    tok = lm.tokenizer
    n_ctx = int(lm.n_ctx)
    prompts = df["prompt"].tolist()
    ids_col = df["prompt_id"].tolist()
    targets = df["target"].tolist() if "target" in cols else [None] * len(df)
    choices = df["choices"].tolist() if "choices" in cols else [None] * len(df)
    spans = df["spans"].tolist() if "spans" in cols else [None] * len(df)
    families = df["family"].tolist() if "family" in cols else [None] * len(df)
    choice_cache: dict[tuple[str, ...], np.ndarray] = {}
    items: list[Item] = []
    for lo in range(0, len(prompts), ENCODE_CHUNK):
        texts = prompts[lo : lo + ENCODE_CHUNK]
        for k, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise InputError(
                    f"{where}: column 'prompt' of prompt {ids_col[lo + k]!r}: "
                    f"expected non-empty text, found {t!r}"
                )
        names = [str(x) for x in ids_col[lo : lo + ENCODE_CHUNK]]
        try:
            with _quiet_transformers():  # its own too-long warning; ours names the prompt
                enc = lm.encode(texts, names=names, device="cpu")
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        input_ids = _np(enc.input_ids)
        offsets = enc.offsets
        n_prefix = list(getattr(enc, "n_prefix", None) or [0] * len(texts))
        chunk_targets = [None if is_missing(t) else str(t) for t in targets[lo : lo + ENCODE_CHUNK]]
        with _quiet_transformers():
            chunk_t_ids = target_ids_batch(
                tok,
                texts,
                chunk_targets,
                [input_ids[k, n_prefix[k] : enc.lengths[k]].tolist() for k in range(len(texts))],
            )
        for k in range(len(texts)):
            i = lo + k
            pid = names[k]
            n = int(enc.lengths[k])
            ids = input_ids[k, :n].astype(np.int64)
            target = chunk_targets[k]
            t_ids = None
            if target:
                t_ids = np.asarray(chunk_t_ids[k], dtype=np.int64)
                if len(t_ids) == 0:
                    t_ids, target = None, None
            n_t = 0 if t_ids is None else len(t_ids)
            if n + n_t > n_ctx or n + settings.generate > n_ctx:
                extra = f" + {n_t} target tokens" if n_t else ""
                if settings.generate:
                    extra += f" (+ {settings.generate} generated)"
                raise InputError(
                    f"{where}: prompt {pid!r} is {n} tokens{extra}, longer than the model's "
                    f"context of {n_ctx} tokens"
                )
            c_ids = None
            ch = choices[i]
            if not is_missing(ch):
                ch = tuple(str(c) for c in ch)
                if ch:
                    if ch not in choice_cache:
                        try:
                            choice_cache[ch] = np.asarray(lm.choice_token_ids(list(ch)), np.int64)
                        except InputError as exc:
                            raise InputError(
                                f"{where}: column 'choices' of prompt {pid!r}: {exc}"
                            ) from None
                    c_ids = choice_cache[ch]
            sp: dict[str, tuple[int, int]] = {}
            off = None
            if need_spans:
                sp = pos.parse_spans(spans[i], pid, where)
                off = _np(offsets[k])[:n] if offsets is not None else None
                if off is None:
                    raise InputError("the tokenizer gives no character offsets; spans unusable")
            act_pos: list[np.ndarray] = []
            act_label: list[str] = []
            try:
                if settings.sites:
                    for spec in settings.positions:
                        p = pos.resolve(spec, n, off, sp, pid)
                        act_pos.append(p)
                        act_label += [spec] * len(p)
                attn_pos = {
                    span: pos.resolve(span, n, off, sp, pid, option="--attention-to")
                    for span in settings.attention_to
                }
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            fam = families[i]
            items.append(
                Item(
                    index=first_index + i,
                    prompt_id=pid,
                    ids=ids,
                    target=target,
                    target_ids=t_ids,
                    choice_ids=c_ids,
                    family=None if is_missing(fam) else str(fam),
                    act_pos=np.concatenate(act_pos) if act_pos else np.zeros(0, np.int64),
                    act_label=act_label,
                    attn_pos=attn_pos,
                )
            )
    return items


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------- scoring


class Scorer:
    """Runs batches for one model and one set of settings."""

    def __init__(self, lm: Any, settings: Settings, extractor: Any = None):
        import torch

        self.torch = torch
        self.lm = lm
        self.settings = settings
        self.model = lm.model
        self.device = lm.device
        self.pad = lm.pad_id
        self.extractor = extractor
        self.attn_sites = (
            [f"attn.{layer}" for layer in range(lm.n_layers)] if settings.attention_to else []
        )
        self.read = list(settings.sites) + [s for s in self.attn_sites if s not in settings.sites]
        self.keep_ok = "logits" not in settings.sites and lm.accepts("logits_to_keep")
        self.act_dtype = getattr(torch, settings.act_dtype)

    # ---------------------------------------------------------------- forward
    def score(
        self, items: list[Item]
    ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, np.ndarray]]:
        """One batch -> (outcome rows, coordinate columns, site -> activation rows)."""
        torch = self.torch
        B = len(items)
        lengths = [it.n + it.n_target for it in items]
        L = max(lengths)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, it in enumerate(items):
            ids[b, : it.n] = torch.from_numpy(it.ids)
            if it.n_target:
                ids[b, it.n : lengths[b]] = torch.from_numpy(it.target_ids)
            mask[b, : lengths[b]] = 1
        # positions whose next-token distribution we need: n-1 .. n+T-2
        need = [np.arange(it.n - 1, it.n - 1 + max(1, it.n_target)) for it in items]
        kwargs: dict[str, Any] = {}
        if self.keep_ok:
            keep = np.unique(np.concatenate(need))
            kwargs["logits_to_keep"] = torch.from_numpy(keep).to(self.device)
            col_of = {int(p): j for j, p in enumerate(keep)}
        else:
            col_of = None
        with torch.inference_mode():
            if self.read:
                with self.lm.trace(read=self.read) as tr:
                    out = self.model(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        use_cache=False,
                        **kwargs,
                    )
                values = {s: tr[s] for s in self.read}
            else:
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                    **kwargs,
                )
                values = {}
            logits = out.logits
            rows = self._outcomes(items, logits, need, col_of)
            del out, logits
            if self.attn_sites:
                self._attention(items, rows, values)
            coords, acts = self._acts(items, ids, values)
        del values
        if self.settings.generate:
            self._generate(items, rows)
        return rows, coords, acts

    def _outcomes(self, items, logits, need, col_of) -> list[dict[str, Any]]:
        """Scores for a batch with a handful of batched tensor ops, then numpy per row."""
        torch = self.torch
        dev = logits.device
        counts = [len(x) for x in need]
        flat_b = np.repeat(np.arange(len(items)), counts)
        flat_p = np.concatenate(need)
        cols = flat_p if col_of is None else np.array([col_of[int(p)] for p in flat_p])
        lg = logits[torch.from_numpy(flat_b).to(dev), torch.from_numpy(cols).to(dev)].float()
        logp = torch.log_softmax(lg, dim=-1)  # (rows, V): one row per scored position
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        tgt = np.concatenate(
            [it.target_ids if it.n_target else np.zeros(1, np.int64) for it in items]
        )
        t = torch.from_numpy(tgt).to(dev)
        picked = logp.gather(1, t[:, None])[:, 0].cpu().numpy()
        hit = (lg.argmax(dim=-1) == t).cpu().numpy()
        fi = torch.from_numpy(first).to(dev)
        last = lg.index_select(0, fi)  # (B, V) next-token logits after the prompt
        rank = (last > last.gather(1, t.index_select(0, fi)[:, None])).sum(dim=-1).cpu().numpy()
        with_choices = [b for b, it in enumerate(items) if it.choice_ids is not None]
        first_logp = logp.index_select(0, fi[with_choices]).cpu().numpy() if with_choices else None
        rows = []
        for b, it in enumerate(items):
            row: dict[str, Any] = {
                "prompt_id": it.prompt_id,
                "n_tokens": it.n,
                "target_n_tokens": it.n_target or None,
                "target_logprob": None,
                "target_rank": None,
                "correct": None,
                "choice_probs": None,
                "choice_probs_raw": None,
                "choice_pred": None,
            }
            if it.n_target:
                sl = slice(first[b], first[b] + counts[b])
                row["target_logprob"] = float(picked[sl].astype(np.float64).sum())
                row["target_rank"] = int(rank[b])
                row["correct"] = bool(hit[sl].all())
            if it.choice_ids is not None:
                lp = first_logp[with_choices.index(b)][it.choice_ids].astype(np.float64)
                raw = np.exp(lp)
                renorm = np.exp(lp - lp.max())
                renorm /= renorm.sum()
                row["choice_probs"] = [float(x) for x in renorm]
                row["choice_probs_raw"] = [float(x) for x in raw]
                row["choice_pred"] = int(np.argmax(lp))
            rows.append(row)
        return rows

    def _attention(self, items, rows, values) -> None:
        """Attention mass from each prompt's last token to each --attention-to span."""
        torch = self.torch
        B = len(items)
        q = np.array([it.n - 1 for it in items])
        masks = {}
        for span in self.settings.attention_to:
            m = np.zeros((B, max(len(it.ids) + it.n_target for it in items)), np.float32)
            for b, it in enumerate(items):
                m[b, it.attn_pos[span]] = 1.0
            masks[span] = m
        for layer, site in enumerate(self.attn_sites):
            pat = values[site]  # (B, H, q, k)
            dev = pat.device
            from_last = pat[torch.arange(B, device=dev), :, torch.from_numpy(q).to(dev)]
            from_last = from_last.float()  # (B, H, k)
            for span, m in masks.items():
                mass = (from_last * torch.from_numpy(m).to(dev)[:, None, :]).sum(-1).cpu()
                for b, per_head in enumerate(mass.tolist()):
                    for h, value in enumerate(per_head):
                        rows[b][f"attn_to.{span}.L{layer}.H{h}"] = float(value)

    def _acts(self, items, ids, values) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        torch = self.torch
        sites = self.settings.sites
        if not sites:
            return {}, {}
        b_idx = np.concatenate(
            [np.full(len(it.act_pos), b, np.int64) for b, it in enumerate(items)]
        )
        p_idx = np.concatenate([it.act_pos for it in items])
        coords = {
            "prompt_id": [it.prompt_id for it in items for _ in range(len(it.act_pos))],
            "prompt_index": np.concatenate(
                [np.full(len(it.act_pos), it.index, np.int64) for it in items]
            ),
            "position": p_idx.astype(np.int32),
            "position_label": [lab for it in items for lab in it.act_label],
            "token_id": ids[torch.from_numpy(b_idx), torch.from_numpy(p_idx)]
            .numpy()
            .astype(np.int32),
        }
        acts = {}
        for site in sites:
            v = values[site]
            bi = torch.from_numpy(b_idx).to(v.device)
            pi = torch.from_numpy(p_idx).to(v.device)
            acts[site] = v[bi, pi].to(self.act_dtype).cpu().numpy()
        return coords, acts

    # ---------------------------------------------------------------- generation
    def _generate(self, items, rows) -> None:
        torch = self.torch
        tok = self.lm.tokenizer
        B = len(items)
        L = max(it.n for it in items)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, it in enumerate(items):  # left padding for generation
            ids[b, L - it.n :] = torch.from_numpy(it.ids)
            mask[b, L - it.n :] = 1
        eos = getattr(tok, "eos_token_id", None)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=self.settings.generate,
                min_new_tokens=0,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad,
                eos_token_id=eos,
            )
        new = out[:, L:].cpu().tolist()
        for b, it in enumerate(items):
            toks = new[b]
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            text = tok.decode(toks, skip_special_tokens=True)
            answer = self._extract(it, text)
            rows[b]["generation"] = text
            rows[b]["answer"] = answer
            if it.target is None or answer is None:
                rows[b]["exact_match"] = None
            else:
                rows[b]["exact_match"] = answer.strip() == it.target.strip()

    def _extract(self, it: Item, text: str) -> str | None:
        if self.extractor is not None:
            fn = self.extractor(it.family)
            if fn is not None:
                got = fn(text)
                return None if got is None else str(got)
        for line in text.splitlines():
            if line.strip():
                return line.strip()
        return ""


def find_extractor(family: str | None) -> Any:
    """The answer extractor of a ``dolm.tasks`` family (arith: its final number), or None."""
    if not family:
        return None
    import importlib

    from dolm.tasks import FAMILIES

    if family not in FAMILIES:
        return None
    mod = importlib.import_module(FAMILIES[family].fn.__module__)
    fn = getattr(mod, "extract_answer", None)
    return fn if callable(fn) else None


__all__ = [
    "Item",
    "Scorer",
    "Settings",
    "continuation_ids",
    "target_ids_batch",
    "find_extractor",
    "plan_items",
]
