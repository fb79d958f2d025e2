"""A planted circuit: a 2-layer GPT-2 whose hand-set attention weights implement induction.

The residual stream is split into subspaces (a ``dump`` coordinate keeps every written
vector zero-mean, so LayerNorm only rescales): token identity ``tok``, position ``pos``,
the previous token ``prev``, the predicted token ``out``, and ``junk`` (written by the
distractor heads and the small MLPs, read by nothing but the MLPs).

- ``head.0.0`` (previous-token head): query reads position p, key reads position p - 1;
  value reads the token, output writes it into ``prev``.
- ``head.1.0`` (induction head): query reads the current token (``tok``), key reads
  ``prev`` (K-composition with head.0.0), value reads the token, output writes ``out``.
- ``lm_head`` reads ``out``. ``head.0.1`` and ``head.1.1`` are random distractors writing
  ``junk``; the MLPs are small and touch only ``junk`` (the circuit does not use them).

On ``" a b c d e f a b c"`` the model predicts ``" d"``. With counterfactual prompts of
the same positions and other tokens, the edges that carry the answer are
:data:`PLANTED_EDGES` (the positional q/k edges into head.0.0 carry positions, which the
counterfactual does not change). ``build_planted_induction(dir)`` writes an HF folder
(config, weights, word-level tokenizer) that ``dolm.models.load`` loads.
"""

from __future__ import annotations

from pathlib import Path

SYMBOLS = tuple("abcdefghijkl")
N_POS = 24
#: (source, target, channel) of the planted circuit
PLANTED_EDGES = (
    ("embed", "head.0.0", "v"),
    ("head.0.0", "head.1.0", "k"),
    ("embed", "head.1.0", "q"),
    ("embed", "head.1.0", "v"),
    ("head.1.0", "logits", None),
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    for i, s in enumerate(SYMBOLS):
        vocab["\u0120" + s] = i + 2
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=N_POS,
                                   padding_side="right", clean_up_tokenization_spaces=False,
                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>")


def build_planted_induction(out_dir, seed: int = 0, strength: float = 2.0) -> Path:
    """Write the planted induction model + tokenizer to ``out_dir``; return the path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nv = len(SYMBOLS) + 2
    d, n_head = 80, 2
    dh = d // n_head
    dump = 0
    tok = [1 + i for i in range(nv)]
    pos = [1 + nv + p for p in range(N_POS)]
    prev = [1 + nv + N_POS + i for i in range(nv)]
    outc = [1 + 2 * nv + N_POS + i for i in range(nv)]
    junk = list(range(1 + 3 * nv + N_POS, d))
    cfg = GPT2Config(vocab_size=nv, n_positions=N_POS, n_embd=d, n_layer=2, n_head=n_head,
                     n_inner=4 * d, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                     pad_token_id=1)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    s = strength
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        for i in range(nv):
            tr.wte.weight[i, tok[i]] = 1.0
            tr.wte.weight[i, dump] = -1.0
        for p in range(N_POS):
            tr.wpe.weight[p, pos[p]] = 1.0
            tr.wpe.weight[p, dump] = -1.0
        for blk in tr.h:
            blk.ln_1.weight.fill_(1.0)
            blk.ln_2.weight.fill_(1.0)
        tr.ln_f.weight.fill_(1.0)
        w0 = tr.h[0].attn.c_attn.weight  # (d, 3d): q | k | v, head h at h*dh
        for p in range(1, N_POS):
            w0[pos[p], p - 1] = s          # q of position p looks for p - 1
        for p in range(N_POS):
            w0[pos[p], d + p] = s          # k of position p
        for i in range(nv):
            w0[tok[i], 2 * d + i] = 1.0    # v: the token
        o0 = tr.h[0].attn.c_proj.weight    # (d, d): rows are head dims
        for i in range(nv):
            o0[i, prev[i]] = 1.0
            o0[i, dump] = -1.0
        w1 = tr.h[1].attn.c_attn.weight
        for i in range(nv):
            w1[tok[i], i] = s              # q: current token
            w1[prev[i], d + i] = s         # k: previous token at the key position
            w1[tok[i], 2 * d + i] = 1.0    # v: the token at the key position
        o1 = tr.h[1].attn.c_proj.weight
        for i in range(nv):
            o1[i, outc[i]] = 1.0
            o1[i, dump] = -1.0
        for lyr in range(2):               # distractor heads: random, write junk only
            w = tr.h[lyr].attn.c_attn.weight
            for blk_off, scale in ((0, 1.0), (d, 1.0), (2 * d, 0.1)):
                w[:, blk_off + dh: blk_off + 2 * dh] = torch.randn(d, dh, generator=gen) * scale
            o = tr.h[lyr].attn.c_proj.weight
            o[dh:2 * dh, junk] = torch.randn(dh, len(junk), generator=gen) * 0.03
            o[dh:2 * dh, dump] = -o[dh:2 * dh, junk].sum(1)
            # a small MLP reading and writing junk: the circuit does not use it, but the
            # model stays a real GPT-2 (dolm's load-time identities need MLPs that respond)
            mlp = tr.h[lyr].mlp
            mlp.c_fc.weight[junk] = torch.randn(len(junk), 4 * d, generator=gen) * 0.05
            mlp.c_proj.weight[:, junk] = torch.randn(4 * d, len(junk), generator=gen) * 0.05
            mlp.c_proj.weight[:, dump] = -mlp.c_proj.weight[:, junk].sum(1)
        for i in range(nv):
            model.lm_head.weight[i, outc[i]] = 10.0
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return out


def planted_prompts(n: int = 16, length: int = 6, seed: int = 0):
    """Prompts for the planted model: a random sequence of distinct symbols repeated up
    to a random cut; target = the next symbol; the counterfactual has other symbols at the
    same positions (foil = its target). A prompts-table DataFrame."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cut = int(rng.integers(1, length))
        while True:
            a = list(rng.choice(SYMBOLS, size=length, replace=False))
            b = list(rng.choice(SYMBOLS, size=length, replace=False))
            if a[cut] != b[cut]:
                break
        def text(s, cut=cut):
            return "".join(" " + c for c in s + s[:cut])
        rows.append(dict(prompt_id=f"ind-{i:03d}", family="induction", prompt=text(a),
                         target=" " + a[cut], foil=" " + b[cut], choices=None,
                         cf_prompt=text(b), cf_target=" " + b[cut], cf_foil=" " + a[cut],
                         spans=None, cf_spans=None, group_id=None, split="eval"))
    return pd.DataFrame(rows)
