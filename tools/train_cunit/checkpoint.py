"""Save / load a trained CausalNetwork as a dolm safetensors checkpoint."""

from __future__ import annotations

import json

import torch

from .engine import CausalNetwork

SCHEMA = "cunit_checkpoint"


def save(net: CausalNetwork, nodes: list[str], path: str, run=None, force=False,
         config: dict | None = None) -> None:
    from dolm.formats import save_safetensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    extra = {"nodes": list(nodes), "mechanism": net.unit.mechanism, "hidden": net.unit.hidden,
             "config": config or {}}
    save_safetensors(tensors, path, schema=SCHEMA, run=run, force=force, extra=extra)


def load(path: str, run=None) -> tuple[CausalNetwork, list[str], dict]:
    """Returns (network in eval mode, node names, extra metadata)."""
    from dolm.formats import load_safetensors
    from dolm.formats.io import KEY_EXTRA, read_safetensors_metadata

    tensors, _meta = load_safetensors(path, schema=SCHEMA, run=run)
    extra = json.loads(read_safetensors_metadata(path).get(KEY_EXTRA, "{}"))
    nodes = extra["nodes"]
    net = CausalNetwork(len(nodes), extra["mechanism"], int(extra.get("hidden", 16)))
    net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})
    net.eval()
    return net, nodes, extra
