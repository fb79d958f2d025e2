"""Edge-level circuits: the computational graph, edge interventions, edge scores
(EAP, EAP-IG, exact patching), circuit evaluation, and a planted ground-truth model.

See :mod:`dolm.circuits.graph` (nodes, edges, the edge-level pass),
:mod:`dolm.circuits.scores` (scores and faithfulness), :mod:`dolm.circuits.planted`.
"""
