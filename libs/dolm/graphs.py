"""Small graph helpers shared by tools: a directed cycle search on an adjacency matrix."""

from __future__ import annotations

import numpy as np


def find_cycle(B: np.ndarray) -> list[int] | None:
    """One directed cycle as a node list, or None."""
    B = np.asarray(B) != 0
    d = B.shape[0]
    color = [0] * d
    parent = [-1] * d
    for s in range(d):
        if color[s]:
            continue
        stack = [(s, iter(np.flatnonzero(B[s])))]
        color[s] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                continue
            nxt = int(nxt)
            if color[nxt] == 0:
                color[nxt] = 1
                parent[nxt] = node
                stack.append((nxt, iter(np.flatnonzero(B[nxt]))))
            elif color[nxt] == 1:
                cycle = [nxt]
                cur = node
                while cur != nxt:
                    cycle.append(cur)
                    cur = parent[cur]
                return cycle[::-1]
    return None
