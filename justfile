# dolm recipes. `just --list --list-submodules` shows them all.
#
# Studies are modules in pipelines/, each built only from dolm tools; run one with
# `just <study>::all` (outputs under runs/<study>/), or a single stage with
# `just <study>::<stage>`. Swap a stage by hand by writing a file of the same schema.
set shell := ["bash", "-euo", "pipefail", "-c"]

export HF_HUB_OFFLINE := "1"
export HF_HUB_DISABLE_PROGRESS_BARS := "1"
export TOKENIZERS_PARALLELISM := "false"

# prompt level: instruction format -> completion (propensity score matching)
mod formats-psm 'pipelines/formats_psm.just'
# prompt level: chain-of-thought -> accuracy through attention (mediation)
mod cot-mediation 'pipelines/cot_mediation.just'
# Bayesian updating: evidence sweep, probes, head scan, ablation, steering, robustness
mod bayes 'pipelines/bayes.just'
# option-choice dilemmas: causal tracing on counterfactual swaps
mod dilemma 'pipelines/dilemma.just'
# factual recall: ROME-style noise tracing over the subject
mod factual 'pipelines/factual.just'
# logit/tuned lens and direct logit attribution for the dilemma and bayes studies
mod lens_dla 'pipelines/lens_dla.just'
# causal-unit network: do() with gradient blocking, DAG learning, ablations
mod cunit 'pipelines/cunit.just'
# edge-level circuits (EAP, EAP-IG, exact) and their faithfulness for dilemma, factual, bayes
mod circuit 'pipelines/circuit.just'

root := justfile_directory()
demo_dir := root / "runs" / "demo"

default:
    @just --list --list-submodules

# The whole test suite (what CI runs).
test:
    python -m pytest -q -n 2 --durations=20

# torch stays the CPU wheel the README installs first; prints the versions it took.
# The suite on the newest releases pyproject.toml allows: no lock, a fresh .venv-latest.
test-latest:
    #!/usr/bin/env bash
    set -euo pipefail
    venv="${DOLM_LATEST_VENV:-{{root}}/.venv-latest}"
    rm -rf "$venv"
    python3 -m venv "$venv"
    . "$venv/bin/activate"
    pip install -q torch==2.13.0
    pip install -q --upgrade -e '.[dev,reference]'
    pip freeze --exclude-editable > "$venv/versions.txt"
    echo "test-latest: $(wc -l < "$venv/versions.txt") packages, e.g.:" >&2
    grep -iE '^(torch|transformers|tokenizers|bitsandbytes|accelerate|numpy|pandas|pyarrow|h5py|scipy|scikit-learn|statsmodels|dowhy|transformer.lens)==' "$venv/versions.txt" >&2 || true
    python -m pytest -q -n 2 --durations=10

# Review the diff and run `just test` before committing a new lock.
# Regenerate requirements/lock.txt: exact versions of every dependency, by pip-tools.
lock:
    python -m pip install -q 'pip-tools>=7.4'
    pip-compile --quiet --strip-extras --allow-unsafe --extra dev --extra reference --extra gpu \
        --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
        -o requirements/lock.txt pyproject.toml requirements/lock.in
    sed -i -E 's/^(torch==[0-9.]+)\+cpu/\1/' requirements/lock.txt

# Lint.
lint:
    ruff check .

# Every causal-LM type of the installed transformers, built tiny and loaded through dolm:
# SUPPORTED / REFUSED / SKIPPED into docs/models.md (about 5 minutes on one busy core).
census:
    OMP_NUM_THREADS=1 python -m dolm.models.census --out docs/models.md

# The user guide (MkDocs + Material) into site/; open site/index.html. Tool reference pages
# are rendered from each tool's --help at build time (docs/hooks.py).
docs:
    NO_MKDOCS_2_WARNING=1 mkdocs build --strict -d site

# The main job on the embedded model: prompts -> outcomes -> validate for every family,
# every study at demo size, then one HTML report (runs/demo/report.html).
demo:
    #!/usr/bin/env bash
    set -euo pipefail
    out={{demo_dir}}
    mkdir -p "$out/families"
    for fam in factual bayes formats arith dilemma; do
        dolm-gen-prompts "$fam" --n 24 --seed 0 -o "$out/families/$fam.prompts.parquet" --force
        extra=()
        if [ "$fam" = arith ]; then extra=(--generate 40 --attention-to numbers); fi
        dolm-collect-acts "$out/families/$fam.prompts.parquet" --model toy \
            -o "$out/families/$fam.outcomes.parquet" --acts "$out/families/$fam.acts.h5" \
            --sites 'resid_post.*' --positions last "${extra[@]}" --force
        dolm-validate "$out/families/$fam.prompts.parquet" "$out/families/$fam.outcomes.parquet" \
            "$out/families/$fam.acts.h5"
    done
    export DOLM_RUNS="$out" DOLM_N=24
    just dilemma::all
    just factual::all
    DOLM_BAYES_PERMS=4 just bayes::all
    just lens_dla::all
    DOLM_N=200 just formats-psm::all
    DOLM_N=40 DOLM_SIMS=200 just cot-mediation::all
    DOLM_CUNIT_D=6 just cunit::data cunit::grads cunit::fit cunit::plot
    DOLM_N=8 DOLM_CIRCUIT_FROM="$out/families" just circuit::all
    dolm-plot report "$out" -o "$out/report.html" --force
    echo "report: $out/report.html" >&2

# Retrain the embedded model organism from scratch (see models/toy/README.md).
toy:
    dolm-toy train --config tools/toy/toy_config.toml -o models/toy --force

# Benchmarks (ratios side by side in one run); results in benchmarks/results/, BENCHMARKS.md.
bench:
    python benchmarks/collect_acts.py
    python benchmarks/patch.py
    python benchmarks/psm.py
    python benchmarks/mediate.py
    python benchmarks/cunit.py
    python benchmarks/crash_resume.py --out benchmarks/results/crash_resume.md
