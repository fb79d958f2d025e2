"""The engine (patch, ablate, steer, mediate) and the tuned lens read logits through
``adapter.logits_from_final_norm``: on a Cohere (``logit_scale`` 0.5) and a Gemma 2 (final
soft-cap, set to 0.5 so it bends logits of ~1), a run that writes nothing gives the Hugging
Face model's own logits, from every start layer, and the bare unembedding would not.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["cohere", "gemma2"])
def lm(request, tmp_path_factory):
    from dolm.models import census, load

    folder = census.build(request.param, tmp_path_factory.mktemp(request.param) / "m")
    if request.param == "gemma2":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["final_logit_softcapping"] = 0.5
        (folder / "config.json").write_text(json.dumps(cfg))
    return load(str(folder))


def test_unwritten_runs_give_the_models_logits(lm):
    from dolm.engine import entry_site, run_rows, unembed
    from dolm_tools.lens.tuned import readout

    enc = lm.encode(["the cat sat on the mat", "- a dog"])
    n, t = lm.n_layers, enc.input_ids.shape[1]
    sites = [entry_site(lm, layer) for layer in range(n + 1)]
    with torch.no_grad(), lm.trace(read=sites) as tr:
        want = lm.forward(enc).logits
    real = enc.attention_mask.bool()
    assert lm.adapter.logit_ops  # the model transforms its unembedding's output
    with torch.no_grad():
        bare = lm.adapter.unembed(lm.adapter.final_norm(tr[sites[-1]]))
        assert (bare - want)[real].abs().max() > 0.05  # so the test can tell them apart
        for start in (0, n // 2, n):
            h = run_rows(lm, [start, start], lambda layer, a, z: tr[entry_site(lm, layer)][a:z],
                         t)
            got = unembed(lm, h)
            assert (got - want)[real].abs().max() < 1e-5, (lm.info["model_type"], start)
        got = unembed(lm, h, enc.last_index)
        ref = want[torch.arange(2), enc.last_index]
        assert (got - ref).abs().max() < 1e-5
        lens = readout(lm, tr[sites[-1]][real])  # the tuned lens's readout of the last layer
        assert (lens - want[real]).abs().max() < 1e-5
