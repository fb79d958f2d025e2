"""dolm-collect-acts: a prompts table + a model -> outcomes (Parquet) and activations (HDF5).

Outcomes (schema ``outcomes``, one row per prompt, prompts-table order):
``prompt_id``, ``n_tokens`` (prompt tokens, BOS included where the tokenizer adds one),
``target_n_tokens``, ``target_logprob`` (natural log, summed over the target's tokens,
teacher-forced on prompt + target), ``target_rank`` (tokens with a strictly higher logit
than the first target token; 0 = top), ``correct`` (every target token is the argmax:
greedy decoding writes the target), ``choice_probs`` (over the choices' tokens,
renormalised), ``choice_probs_raw`` (full softmax), ``choice_pred``; with ``--generate N``:
``generation``, ``answer`` (arith: ``dolm.tasks.extract_answer``; else the first
non-empty line), ``exact_match``; with ``--attention-to SPAN``:
``attn_to.<SPAN>.L<l>.H<h>`` (attention mass from the last prompt token to the span).

Activations (schema ``activations``): one row per (prompt, selected position); coordinate
datasets ``prompt_id``, ``prompt_index``, ``position``, ``position_label``, ``token_id``
and one ``(rows, width)`` dataset per site named as the site (``resid_post.3``,
``head.1.2``, ...), float32 or float16, chunked, gzip; root attribute ``dolm.extra``
records sites, positions, model and prompts hash.

Modules: ``cli`` (click commands), ``collect`` (the run), ``engine`` (planning and batch
scoring), ``positions`` (position specs and spans), ``store`` (journal + HDF5 appends,
resume), ``merge`` (shards).
"""
