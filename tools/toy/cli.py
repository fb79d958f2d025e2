"""dolm-toy: train the embedded model organism and write its card.

    dolm-toy train [--config FILE] [--device cpu|cuda|auto] [--seed N] -o models/toy
    dolm-toy eval  [--model models/toy] [-o metrics.json]
    dolm-toy card  [--model models/toy]       # re-measures and rewrites the card's metrics

Heavy imports live inside the commands so that ``--help`` is fast.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "toy"


def _fail(msg: str, code: int) -> None:
    click.echo(f"dolm-toy: error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train and describe dolm's embedded model organism (models/toy)."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="training config (TOML); default tools/toy/toy_config.toml")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a config value (TOML syntax), e.g. --set train.steps=500")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=str(DEFAULT_MODEL_DIR),
              show_default=True, help="folder to write the HF model to")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--seed", type=int, default=None, help="seed (default: the config's)")
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--force", is_flag=True, help="overwrite model files in --output")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--eval-every", type=int, default=None,
              help="quick held-out evaluation every N steps (stderr)")
def train(config_path, overrides, output, device, seed, threads, force, no_progress, eval_every):
    """Train the toy model from scratch (deterministic from --seed)."""
    from .config import load_config

    try:
        cfg = load_config(config_path, list(overrides))
    except (OSError, ValueError) as e:
        _fail(f"--config: {e}", 3)
    out = Path(output)
    if (out / "model.safetensors").exists() and not force:
        _fail(f"{out}/model.safetensors exists; pass --force to overwrite", 3)
    import torch

    if threads:
        torch.set_num_threads(threads)
    if eval_every is not None:
        cfg["train"]["eval_every"] = eval_every
    from .evaluate import quick_eval_fn
    from .train import train as run_train

    command = "dolm-toy " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        summary = run_train(cfg, out, device=device, seed=seed, show_progress=not no_progress,
                            command=command, eval_fn=quick_eval_fn(cfg))
    except ValueError as e:
        _fail(str(e), 3)
    click.echo(json.dumps({k: summary[k] for k in
                           ("n_params", "steps", "train_seconds", "final_loss", "device")}),
               err=True)


@main.command("eval")
@click.option("--model", "model_dir", type=click.Path(file_okay=False),
              default=str(DEFAULT_MODEL_DIR), show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="-",
              help="metrics JSON ('-' = stdout)")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="keep the prompts/outcomes tables here (default: a temporary folder)")
@click.option("--quick", is_flag=True,
              help="in-process evaluation (no dolm-gen-prompts/dolm-collect-acts)")
@click.option("--device", default="cpu", show_default=True)
def eval_cmd(model_dir, output, workdir, quick, device):
    """Measure the card metrics on held-out prompts."""
    from .card import measure

    metrics = measure(Path(model_dir), workdir=workdir, quick=quick, device=device)
    text = json.dumps(metrics, indent=2)
    if output == "-":
        click.echo(text)
    else:
        Path(output).write_text(text + "\n")


@main.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False),
              default=str(DEFAULT_MODEL_DIR), show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="keep the prompts/outcomes tables here (default: a temporary folder)")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, exists=True),
              default=None, help="use metrics JSON from `dolm-toy eval` instead of measuring")
@click.option("--device", default="cpu", show_default=True)
def card(model_dir, workdir, metrics_path, device):
    """Re-measure the metrics with dolm's own tools and rewrite the model card."""
    from .card import measure, write_card

    model_dir = Path(model_dir)
    if metrics_path:
        metrics = json.loads(Path(metrics_path).read_text())
    else:
        metrics = measure(model_dir, workdir=workdir, quick=False, device=device)
    write_card(model_dir, metrics)
    click.echo(f"dolm-toy: wrote {model_dir / 'README.md'}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
