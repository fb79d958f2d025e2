"""dolm-plot report reads as answers: organised by study, the first screen holds each
study's question and headline numbers (read from the study's own files, with intervals);
figures compare files only like with like; degenerate figures are refused, and said why."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dolm.formats import write_json, write_table
from test_plot import (
    bayes_prompts,
    dag_obj,
    dolm_plot,
    effects_trace,
    exe,
    make_run,
    mediation_comparison_table,
    outcomes_for,
    patch_summary_table,
    psm_check_table,
)


def ablation_spanning_layers(n_prompts: int = 4) -> pd.DataFrame:
    """dolm-ablate rows of component sets that span layers: every row carries the layer of
    the set's first component, so a per-layer curve would be one point."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_prompts):
        for name, comp, v in (("baseline", None, 0.0), ("top3 mean", "head.1.0+head.3.2", 0.3),
                              ("bottom3 mean", "head.1.1+head.2.0", -0.1)):
            for metric in ("mae_bayes", "p_x"):
                rows.append(dict(prompt_id=f"p{p}", tool="ablate", intervention=name,
                                 site=None, layer=None if comp is None else 1, position=None,
                                 head=None, window=None, kind="mean", alpha=None,
                                 component=comp, metric=metric,
                                 value=float(v + 0.01 * rng.normal())))
    df = pd.DataFrame(rows)
    for col in ("layer", "position", "head", "window"):
        df[col] = df[col].astype("Int64")
    df["alpha"] = df["alpha"].astype("float64")
    return df


def write_study_run(d: Path) -> dict:
    """A run folder laid out as `just demo` writes it, small and synthetic."""
    files = {}

    def table(rel: str, df: pd.DataFrame, schema: str, tool: str, model: str | None = "toy",
              extra: dict | None = None) -> None:
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(df, path, schema, make_run(tool, model), extra=extra)
        files[rel] = df

    trace = effects_trace(n_prompts=4)
    trace = trace[trace.metric == "recovery"]  # one metric keeps the report quick to draw
    table("dilemma/effects.parquet", trace, "effects", "patch")
    table("dilemma/summary.parquet", patch_summary_table(), "patch_summary", "patch")
    table("formats-psm/comparison.parquet", psm_check_table(), "psm_check", "psm",
          extra={"outcome": "correct"})
    path = d / "formats-psm" / "dag.json"
    write_json(dag_obj(), path, "dag", make_run("psm", None))
    table("cot-mediation/comparison.parquet", mediation_comparison_table(),
          "mediation_comparison", "mediate")
    table("bayes/ablate.parquet", ablation_spanning_layers(), "effects", "ablate")
    prompts = bayes_prompts()
    table("families/bayes.prompts.parquet", prompts, "prompts", "gen-prompts", None)
    table("families/bayes.outcomes.parquet", outcomes_for(prompts, 0.05), "outcomes",
          "collect-acts")
    # a second family's outcomes of the same model: not "two models"
    other = prompts.assign(prompt_id=prompts["prompt_id"] + "-b", family="factual")
    table("families/factual.prompts.parquet", other, "prompts", "gen-prompts", None)
    table("families/factual.outcomes.parquet", outcomes_for(other, 0.2, 1), "outcomes",
          "collect-acts")
    return files


@pytest.fixture(scope="module")
def study_report(tmp_path_factory) -> tuple[Path, dict, str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("report")
    run = d / "demo"
    files = write_study_run(run)
    out = d / "report.html"
    r = subprocess.run([exe(), "report", str(run), "-o", str(out)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return out, files, out.read_text(), r


def test_first_screen_is_the_studies_and_their_headline_numbers(study_report):
    out, files, text, _ = study_report
    body = text[text.index("<body>"):]
    # the title, one line of counts, then the overview of the studies: nothing before it
    first = re.sub(r"^<body>\s*<h1>[^<]*</h1>\s*<p class=\"muted\">.*?</p>\s*", "", body,
                   flags=re.S)
    assert first.startswith('<table class="overview" id="studies">'), first[:200]
    overview = first[: first.index("</table>")]
    for title in ("Bayesian updating", "Dilemma: causal tracing", "propensity score matching",
                  "mediation", "Task families"):
        assert title in overview, title
    # the answers, with their intervals, computed from the files
    t = files["dilemma/effects.parquet"]
    cell = t[(t.metric == "recovery") & (t.site == "resid_pre.2") & (t.position == 4)]
    per = cell.groupby("prompt_id")["value"].mean()
    assert f"L2 @ pos 4: {per.mean():.2f} [" in overview
    psm = psm_check_table().iloc[0]  # ATT
    assert (f"{psm.naive:+.2f} [{psm.naive_ci_low:+.2f}, {psm.naive_ci_high:+.2f}] / "
            f"{psm.matched:+.2f} [{psm.matched_ci_low:+.2f}, {psm.matched_ci_high:+.2f}] / "
            f"{psm.true:+.2f} [{psm.true_ci_low:+.2f}, {psm.true_ci_high:+.2f}]") in overview
    assert "head.2.0: +0.200 [+0.150, +0.250]" in overview  # statistical, largest |ACME|
    assert "head.2.0: -0.100 [-0.150, -0.050]" in overview  # interventional, target_correct
    acc = files["families/bayes.outcomes.parquet"]["correct"].mean()
    assert f"bayes {acc:.2f}" in overview
    base = files["bayes/ablate.parquet"]
    mae = base[(base.intervention == "baseline") & (base.metric == "mae_bayes")]["value"].mean()
    assert f"{mae:.3f} [" in overview
    # each study: question, answer, figures, then details; the file index closes the page
    sections = re.findall(r"<section>.*?</section>", text, flags=re.S)
    assert len(sections) == 5
    for s in sections:
        assert "<details>" in s and "Details:" in s
    assert text.index('id="files"') > text.rindex("</section>")
    assert text.index('id="studies"') < text.index("<section>")
    assert "http://" not in text and "https://" not in text  # self-contained


def test_like_with_like_and_degenerate_figures_skipped_with_a_reason(study_report):
    _, _, text, r = study_report
    names = re.findall(r'<img alt="([^"]+)"', text)
    # two outcome files of one model are not compared as "2 models"
    assert not [n for n in names if n.startswith("compare.")], names
    # one accuracy figure over both families of the model
    assert [n for n in names if "accuracy" in n] == ["all.accuracy"]
    # the per-layer curves of component sets spanning layers are not drawn, and said why
    assert not [n for n in names if n.startswith("ablate.layers")]
    skipped = text[text.index("Figures not drawn"):]
    assert "ablate.layers.mae_bayes" in skipped and "single layer value" in skipped
    assert re.search(r"\d+ figures \(\d+ degenerate ones not drawn\)", text)


def test_report_refuses_to_overwrite(study_report, tmp_path):
    out, *_ = study_report
    r = dolm_plot("report", out.parent / "demo", "-o", out)
    assert r.returncode == 3 and "--force" in r.stderr


def test_first_screen_in_chromium(study_report, tmp_path):
    """Rendered at 1400x900 in headless Chromium, the overview of the studies ends on the
    first screen."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    out, *_ = study_report
    probe = tmp_path / "probe.html"
    script = ("<script>const r=document.getElementById('studies').getBoundingClientRect();"
              "const p=document.createElement('pre');p.id='probe';"
              "p.textContent='top='+r.top+' bottom='+r.bottom+' width='+r.width;"
              "document.body.appendChild(p);</script>")
    probe.write_text(out.read_text().replace("</body>", script + "</body>"))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--window-size=1400,900", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"top=([\d.]+) bottom=([\d.]+) width=([\d.]+)", r.stdout)
    assert m, r.stderr[-2000:]
    top, bottom, width = map(float, m.groups())
    assert top < 150 and bottom <= 900 and width > 800, m.group(0)


# ------------------------------------------------------------------ degenerate figures


def test_degenerate_detects_single_x_and_empty_axes():
    from dolm_tools.plot import style
    from dolm_tools.plot.draw import degenerate

    style.setup()
    fig = style.new_figure("single")
    ax = fig.subplots()
    ax.plot([3], [0.5], marker="o")
    ax.axhline(0)
    ax.set_xlabel("layer")
    assert "single layer value (3)" in degenerate(fig)
    fig = style.new_figure("single")
    a1, a2 = fig.subplots(1, 2)
    a1.plot([0, 1, 2], [1, 2, 3])
    a2.axhline(0)
    a2.set_title("MLP")
    assert degenerate(fig) == "panel 'MLP' has no data"
    fig = style.new_figure("single")
    ax = fig.subplots()
    ax.plot([0, 1], [1, 2])
    ax.fill_between([0, 1], [0, 1], [2, 3])
    assert degenerate(fig) is None


def test_cli_refuses_a_degenerate_figure_asked_for_by_name(tmp_path):
    path = tmp_path / "ablate.parquet"
    write_table(ablation_spanning_layers(), path, "effects", make_run("ablate"))
    out = tmp_path / "figs"
    r = dolm_plot(path, "-o", out, "--only", "layers")
    assert r.returncode == 3, r.stderr
    assert "not drawn" in r.stderr and "single layer value" in r.stderr, r.stderr
    assert not out.exists()  # nothing half-written
    r = dolm_plot(path, "-o", out)  # every figure: the degenerate ones skipped, said so
    assert r.returncode == 0, r.stderr
    written = sorted(Path(p).name for p in r.stdout.split())
    assert written == ["ablate.ablation.mae_bayes.png", "ablate.ablation.p_x.png"], written
    assert "skipped" in r.stderr and "ablate.layers.p_x" in r.stderr


def test_compare_only_like_with_like(tmp_path):
    from dolm_tools.plot.draw import load_sources
    from dolm_tools.plot.registry import plan

    prompts = bayes_prompts()
    paths = {}
    for name, model, pr in (("a", "toy", prompts), ("b", "toy", prompts),
                            ("c", "gpt2-small", prompts),
                            ("d", "gpt2-small", prompts.iloc[:5])):
        paths[name] = tmp_path / f"{name}.parquet"
        write_table(effects_trace(n_prompts=3), paths[name], "effects", make_run("patch", model))
        paths[name + "o"] = tmp_path / f"{name}.outcomes.parquet"
        write_table(outcomes_for(pr, 0.1), paths[name + "o"], "outcomes",
                    make_run("collect-acts", model))

    def compared(*keys: str) -> set[str]:
        plots = plan(load_sources([str(paths[k]) for k in keys]))
        return {p.spec.name for p in plots if p.spec.mode == "compare"}

    assert compared("a", "b") == set()  # one model twice: no comparison
    assert "layers" in compared("a", "c")  # two models, one prompt set
    assert compared("ao", "bo") == set()
    assert compared("ao", "co") == {"scores"}
    assert compared("ao", "do") == set()  # prompt sets differ
    learned = dag_obj()
    other = {"nodes": ["x", "y"], "edges": [{"source": "x", "target": "y"}]}
    for name, obj in (("dag1", dag_obj()), ("dag2", learned), ("dag3", other)):
        paths[name] = tmp_path / f"{name}.json"
        write_json(obj, paths[name], "dag", make_run("psm", None))
    assert compared("dag1", "dag2") == {"dags"}  # same nodes: a learned DAG beside its truth
    assert compared("dag1", "dag3") == set()


def test_intervals_match_statsmodels_and_scipy():
    from dolm_tools.plot.common import mean_ci, wilson
    from scipy import stats
    from statsmodels.stats.proportion import proportion_confint

    for k, n in ((0, 24), (7, 24), (24, 24), (1, 3)):
        lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
        p, lo2, hi2 = wilson(k, n)
        assert p == k / n and lo2 == pytest.approx(lo, abs=1e-6) and \
            hi2 == pytest.approx(hi, abs=1e-6)
    x = np.random.default_rng(0).normal(0.3, 1.0, 17)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    m, lo2, hi2, n = mean_ci(np.append(x, np.nan))
    assert (m, n) == (pytest.approx(x.mean()), 17)
    assert (lo2, hi2) == (pytest.approx(lo), pytest.approx(hi))
