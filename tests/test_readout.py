"""The prompt reader (dolm.readout): one meaning of ``intended_option`` in every tool."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dolm.readout import intended_choice

pytestmark = pytest.mark.usefixtures("one_thread")


def test_intended_choice_text_then_position():
    choices = [" 1", " 2"]
    assert intended_choice(1, choices) == " 1"  # the dilemma family: text "1" names " 1"
    assert intended_choice(2.0, choices) == " 2"
    assert intended_choice(" 2", choices) == " 2"
    assert intended_choice(2, [" A", " B"]) == " B"  # no text match: 1-based position
    assert intended_choice("B", [" A", " B"]) == " B"
    # text wins over position: "2" names the choice " 2", not the second one
    assert intended_choice(2, [" 2", " 1"]) == " 2"
    assert intended_choice(3, [" A", " B"]) is None
    assert intended_choice(None, [" A", " B"]) is None
    assert intended_choice(np.nan, [" A", " B"]) is None
    assert intended_choice(" Rome", None, extra=(" Paris", " Rome")) == " Rome"


def _table(intended):
    from test_patch_helpers import PAIRS, prompts_df

    df = prompts_df(PAIRS, target=" Rome", foil=" Paris")
    df["choices"] = [[" Paris", " Rome"]] * len(df)
    df["intended_option"] = pd.Series(intended, dtype=object)
    return df


def test_text_and_index_intended_option_mean_the_same_in_patch_lens_dla(tiny_lm):
    from dolm_tools.dla.core import resolve as dla_resolve
    from dolm_tools.lens.tokens import resolve as lens_resolve
    from dolm_tools.patch.prepare import read_prompts

    lm = tiny_lm("gpt2")
    by_index = _table([1, 2, 1])
    by_text = _table([" Paris", "Rome", "Paris "])
    seen = {}
    for name, df in (("index", by_index), ("text", by_text)):
        patch = read_prompts(df, lm, mode="counterfactual", metric="auto", path="p.parquet")
        # lens reads the intended option when the target is not among the choices
        lens = lens_resolve(lm, df.assign(target=None), "p.parquet")
        dla = dla_resolve(lm, df, "p.parquet", metric="auto", target=None, foil=None,
                          first_token=False)
        seen[name] = ([p.intended for p in patch], lens.intended, dla)
    assert seen["index"][0] == seen["text"][0] == [" Paris", " Rome", " Paris"]
    assert seen["index"][1] == seen["text"][1] == [0, 1, 0]
    assert seen["index"][2] == seen["text"][2]


def test_frame_orders_and_types_columns_from_the_schema():
    from dolm.formats import frame, load_schema

    rows = [{"value": 1.5, "metric": "m", "prompt_id": "a", "tool": "t", "intervention": "i",
             "layer": 3, "alpha": None, "site": None, "mine": "x"},
            {"value": None, "metric": "m", "prompt_id": "b", "tool": "t", "intervention": "i",
             "layer": None, "alpha": 2, "site": "resid_pre.0", "mine": "y"}]
    df = frame(rows, "effects")
    props = [c for c in load_schema("effects")["properties"] if c != "generation"]
    assert list(df.columns) == props + ["mine"]  # optional 'generation' only when present
    assert str(df["layer"].dtype) == "Int64" and df["layer"].isna().tolist() == [False, True]
    assert df["alpha"].dtype == "float64" and np.isnan(df["alpha"][0]) and df["alpha"][1] == 2
    assert df["site"].tolist() == [None, "resid_pre.0"] and df["window"].isna().all()
    assert "generation" in frame([{**rows[0], "generation": "g"}], "effects").columns
    assert list(frame(rows, "effects", columns=["prompt_id", "value"]).columns) == [
        "prompt_id", "value", "mine"]
