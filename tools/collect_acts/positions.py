"""Which token positions to read: the ``--positions`` language of :mod:`dolm.positions`.

A spec is ``last`` (the last prompt token), ``all`` (every prompt token), integers
(negative = from the end), a span name from the prompts' ``spans`` column (every token
overlapping it), or ``<span>_first`` / ``<span>_last`` (its first / last token). Spans are
``[char_start, char_end)`` in the prompt text; tokens map to characters through the
tokenizer's offsets. Parsing and resolution live once, in :mod:`dolm.positions`.
"""

from __future__ import annotations

from dolm.positions import BUILTIN, needs_spans, parse_spans, parse_specs, resolve, span_tokens

__all__ = ["BUILTIN", "needs_spans", "parse_spans", "parse_specs", "resolve", "span_tokens"]
