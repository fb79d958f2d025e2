"""Prompt task families for dolm-gen-prompts and for training the toy model.

``FAMILIES[name].generate(split="eval"|"train", seed=0, tokenizer=None, **options)``
returns a pandas DataFrame of ``prompts`` rows (docs/CONVENTIONS.md core columns, then
``text`` — the full training string, prompt + continuation — then family columns).
``Family.options`` describes each option (name, type, default, help, choices).
Same seed and options give the same table. Eval and train never share an item: eval
items (arith problems, bayes sequences, formats instances, dilemma instances) are
reserved by a seed-independent hash; factual uses one world of facts and holds out
phrasings for eval.

Helpers for the toy trainer and for collect-acts:

- ``training_text(row)`` — the string to train on (``row["text"]``);
- ``posterior_predictive(tokens, pA, pB, prior)`` — exact P(next = X) per position;
- ``bayes_soft_targets(row)`` — (char offset, P(X)) for every draw in a bayes row's text;
- ``extract_answer(generation)`` — the final number of an arith generation.
"""

from dolm.tasks import arith, bayes, dilemma, factual, formats, from_file
from dolm.tasks.arith import extract_answer
from dolm.tasks.base import CORE_COLUMNS, Family, Option, training_text
from dolm.tasks.bayes import posterior_predictive
from dolm.tasks.bayes import soft_targets as bayes_soft_targets
from dolm.tasks.dilemma import import_json as import_dilemma_json
from dolm.tasks.from_file import from_file as read_from_file

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (factual.FAMILY, bayes.FAMILY, formats.FAMILY, arith.FAMILY, dilemma.FAMILY,
              from_file.FAMILY)
}

# families that generate material (from-file only reads a user's file)
GENERATED = ("factual", "bayes", "formats", "arith", "dilemma")


def generate(family: str, split: str = "eval", seed: int = 0, **options):
    """``FAMILIES[family].generate(split, seed, **options)``."""
    from dolm.errors import InputError

    if family not in FAMILIES:
        raise InputError(f"family: expected one of {', '.join(FAMILIES)}, found {family!r}")
    return FAMILIES[family].generate(split=split, seed=seed, **options)


__all__ = [
    "CORE_COLUMNS", "FAMILIES", "GENERATED", "Family", "Option", "bayes_soft_targets",
    "extract_answer", "generate", "import_dilemma_json", "posterior_predictive",
    "read_from_file", "training_text",
]
