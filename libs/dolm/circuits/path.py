"""Path patching (Wang et al. 2022, the IOI paper) as edge patching.

Path patching from senders S to receivers R (through channel c of a receiving head):
run the reference prompt, give the senders their outputs on the other prompt, freeze
every other node at its reference output, record what the receivers read, then rerun
the reference with only the receivers' inputs replaced (everything downstream of them
recomputed). With every other node frozen, a receiver reads the reference residual plus
``sum_s (other_out[s] - ref_out[s])``: exactly the edge intervention on the edges
S x R.c of :mod:`dolm.circuits.graph`, done in one pass.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np
import torch

from dolm.circuits.graph import CHANNELS, Graph
from dolm.errors import InputError


def path_edges(graph: Graph, senders: str, receivers: str, channels: str = "q,k,v",
               option: str = "--senders/--receivers") -> list[int]:
    """Edge ids from sender patterns to receiver patterns (comma lists, ``*`` globs)."""
    chans = [c.strip() for c in channels.split(",") if c.strip()]
    bad = [c for c in chans if c not in CHANNELS]
    if bad or not chans:
        raise InputError(f"--channels: expected a comma list of q, k, v, found {channels!r}")

    def match(patterns: str, names: list[str], what: str) -> list[str]:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        out = []
        for p in pats:
            hit = [n for n in names if fnmatchcase(n, p)]
            if not hit:
                raise InputError(f"{what} {p!r}: no node of this model matches "
                                 f"({graph.n_layers} layers, {graph.n_heads} heads; nodes: "
                                 "embed, head.L.H, mlp.L, logits)")
            out += [n for n in hit if n not in out]
        return out

    snd = match(senders, graph.senders, "--senders")
    rnames = list(dict.fromkeys(r[0] for r in graph.receivers))
    rcv = match(receivers, rnames, "--receivers")
    ids = []
    for r in rcv:
        for c in (chans if r.startswith("head.") else [None]):
            for s in snd:
                key = (graph.sender_index[s], graph.receiver_index[(r, c)])
                if key in graph.edge_index:
                    ids.append(graph.edge_index[key])
    if not ids:
        raise InputError(f"{option}: no sender of {senders!r} is upstream of a receiver of "
                         f"{receivers!r}")
    return ids


def path_patch(scorer, edge_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference logits, path-patched logits) at the read positions, (N, V) each: the
    edges' senders carry the other run's outputs into their receivers."""
    from dolm.circuits.scores import batches

    g = scorer.g
    mask = g.mask(list(edge_ids))[None].to(scorer.dev)
    refs, outs = [], []
    for a, z in batches(len(scorer.data.prompt_ids), scorer.batch_size):
        clean, corrupt = scorer.base(a, z)
        ids, pos, _ = scorer._b(a, z)
        with torch.no_grad():
            p = scorer.runner.run(ids, pos, patch=corrupt.outs, mask=mask)
        refs.append(clean.logits.cpu())
        outs.append(p.logits.cpu())
    return torch.cat(refs), torch.cat(outs)


def edge_labels(graph: Graph, edge_ids) -> list[str]:
    out = []
    for e in edge_ids:
        s, d, c = graph.edge_name(graph.edges[e])
        out.append(f"{s}->{d}" + (f".{c}" if c else ""))
    return out


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()
