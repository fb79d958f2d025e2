"""factual: subject -> attribute facts over synthetic entities (for causal tracing).

A small fixed world (by ``world_seed``): ``n_entities`` two-word synthetic names
("Zorvak Tellin"), each with one value per relation (home city, job, colour), drawn from
small vocabularies of single words. Phrasings are a prefix (``"Fact:"``, ...) times a
relation core (``"The home city of {s} is"``, ...). The world's facts are the same in
both splits; the eval split uses held-out phrasings (prefix/core combinations never in
train), so eval measures recall of trained facts in new phrasings.

Each row has a counterfactual: the same phrasing with another subject that has the same
number of words (and, when a tokenizer is given, the same number of tokens in the
prompt) and a different value for the relation. ``foil`` is the counterfactual
subject's value, ``cf_foil`` the original one. ``spans``/``cf_spans`` mark ``subject``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dolm.errors import InputError
from dolm.tasks.base import Family, Option, rng_for, spans_json, token_count

RELATIONS: dict[str, dict] = {
    "city": {
        "cores": ["The home city of {s} is", "{s} lives in the city of", "The city of {s} is"],
        "values": [" Paris", " Rome", " Oslo", " Lima", " Cairo", " Dublin", " Madrid", " Vienna"],
    },
    "job": {
        "cores": ["The job of {s} is", "{s} works as a", "The profession of {s} is"],
        "values": [" baker", " doctor", " farmer", " pilot", " singer", " tailor", " lawyer",
                   " nurse"],
    },
    "color": {
        "cores": ["The favorite color of {s} is", "{s} likes the color", "The color of {s} is"],
        "values": [" red", " blue", " green", " yellow", " purple", " orange", " white",
                   " black"],
    },
}

PREFIXES = ["", "Fact: ", "Note: ", "As known, ", "In the records, ", "Today, "]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "tr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "l", "k", "s", "th", "x"]


def phrasing_split(prefix_idx: int, core_idx: int) -> str:
    """Which split a (prefix, core) phrasing belongs to: 1 in 3 combinations are eval."""
    return "eval" if (prefix_idx + core_idx) % 3 == 0 else "train"


def phrasings(relation: str, split: str) -> list[tuple[str, str]]:
    """[(template_id, template)] of a relation for a split; templates contain ``{s}``."""
    out = []
    for ci, core in enumerate(RELATIONS[relation]["cores"]):
        for pi, prefix in enumerate(PREFIXES):
            if phrasing_split(pi, ci) == split:
                lower = prefix.endswith(", ") and not core.startswith("{s}")
                tpl = prefix + (core[0].lower() + core[1:] if lower else core)
                out.append((f"{relation}.p{pi}.c{ci}", tpl))
    return out


def _name(rng: np.random.Generator) -> str:
    syl = [
        _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
        + _CODAS[rng.integers(len(_CODAS))]
        for _ in range(2)
    ]
    return "".join(syl).capitalize()


def world(world_seed: int = 0, n_entities: int = 48) -> pd.DataFrame:
    """The fixed world: one row per entity with ``subject`` and one column per relation."""
    rng = rng_for(world_seed, "factual", "world")
    names: list[str] = []
    seen: set[str] = set()
    used_words: set[str] = set()
    while len(names) < n_entities:
        first, last = _name(rng), _name(rng)
        full = f"{first} {last}"
        if full in seen or first == last or first in used_words or last in used_words:
            continue
        seen.add(full)
        used_words.update([first, last])
        names.append(full)
    rows = {"subject": names}
    for rel, spec in RELATIONS.items():
        k = len(spec["values"])
        # balanced assignment: each value used equally often, shuffled
        vals = [spec["values"][i % k] for i in range(n_entities)]
        rng.shuffle(vals)
        rows[rel] = vals
    return pd.DataFrame(rows)


def _generate(split, seed, tokenizer, n, world_seed, n_entities, relations):
    if n_entities < 2:
        raise InputError(f"--n-entities: expected at least 2, found {n_entities}")
    w = world(world_seed, n_entities)
    rng = rng_for(seed, "factual", split)
    subjects = list(w["subject"])
    rows = []
    dropped = 0
    for rel in relations:
        values = list(w[rel])
        for tid, tpl in phrasings(rel, split):
            if tokenizer is not None:  # token lengths once per (phrasing, subject)
                n_prompt = [token_count(tokenizer, tpl.format(s=x)) for x in subjects]
                n_subject = [token_count(tokenizer, " " + x) for x in subjects]
            for ei, subj in enumerate(subjects):
                prompt = tpl.format(s=subj)
                target = values[ei]
                # counterfactual subject: same word count (all names have 2 words), a
                # different value; with a tokenizer, the same prompt token length.
                cands = [j for j in range(len(subjects)) if j != ei and values[j] != target
                         and len(subjects[j].split()) == len(subj.split())]
                if tokenizer is not None:
                    cands = [j for j in cands if n_prompt[j] == n_prompt[ei]
                             and n_subject[j] == n_subject[ei]]
                if not cands:
                    dropped += 1
                    continue
                cj = int(cands[rng.integers(len(cands))])
                cf_subj = subjects[cj]
                cf_prompt = tpl.format(s=cf_subj)
                s0 = tpl.index("{s}")
                row = {
                    "family": "factual",
                    "prompt": prompt,
                    "target": target,
                    "foil": values[cj],
                    "choices": None,
                    "cf_prompt": cf_prompt,
                    "cf_target": values[cj],
                    "cf_foil": target,
                    "spans": spans_json({"subject": [s0, s0 + len(subj)]}),
                    "cf_spans": spans_json({"subject": [s0, s0 + len(cf_subj)]}),
                    "group_id": f"factual-{rel}-e{ei:03d}",
                    "split": split,
                    "text": prompt + target,
                    "subject": subj,
                    "relation": rel,
                    "attribute": target.strip(),
                    "template_id": tid,
                    "cf_subject": cf_subj,
                    "cf_attribute": values[cj].strip(),
                    "subject_words": len(subj.split()),
                }
                if tokenizer is not None:
                    row["subject_tokens"] = n_subject[ei]
                    row["prompt_tokens"] = n_prompt[ei]
                rows.append(row)
    if dropped and not rows:
        raise InputError(
            "factual: no counterfactual subject with an equal token length for any prompt; "
            "try a larger --n-entities"
        )
    df = pd.DataFrame(rows)
    if n is not None and n < len(df):
        idx = np.sort(rng.choice(len(df), size=n, replace=False))
        df = df.iloc[idx].reset_index(drop=True)
    df.insert(0, "prompt_id", [f"factual-{split}-{i:05d}" for i in range(len(df))])
    df.attrs["dropped_no_cf"] = dropped
    return df


FAMILY = Family(
    name="factual",
    help="Subject -> attribute facts over synthetic entities, with counterfactual subjects.",
    options=[
        Option("n", "int", None, "rows to sample (default: every fact x phrasing)"),
        Option("world_seed", "int", 0, "seed of the fixed world (entities and facts)"),
        Option("n_entities", "int", 48, "number of synthetic entities in the world"),
        Option("relations", "str_list", list(RELATIONS), "relations to ask about",
               choices=tuple(RELATIONS)),
    ],
    fn=_generate,
    columns={
        "subject": "the subject's name", "relation": "city/job/color",
        "attribute": "the subject's value (target without space)",
        "template_id": "relation.pI.cJ: prefix I, core J",
        "cf_subject": "the counterfactual subject", "cf_attribute": "its value",
        "subject_words": "words in the subject",
        "subject_tokens": "tokens in ' subject' (only with a tokenizer)",
        "prompt_tokens": "tokens in the prompt (only with a tokenizer)",
    },
)
