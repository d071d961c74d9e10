"""Exact canary candidate log-likelihoods, scored as a digit trie with shared key/value caches.

A canary is ``prefix_ids + [digit_ids[d] for d in secret]``. Its candidate space R holds all
``10**digits`` digit strings, and exact exposure needs ll(r) = sum of the digit log-probs given the
prefix for every r in R.

Scoring every full sequence costs ``|R| * (len(prefix) + digits)`` token evaluations. The
candidates form a trie, though: every node at depth k (a k-digit string) needs one next-token
distribution, over the 10 digit tokens, and a child's ll is its parent's plus one log-prob. So:

- the prefix runs once, and its keys/values are shared by every node (attention reads them by
  broadcasting, never copying them per node);
- the nodes are visited depth first in batches of at most ``batch_size``. A batch feeds one token
  per node: its last digit. Each node attends to the prefix cache, to its ancestors' cached digit
  keys/values, and to itself. The batch's new keys/values are the cache of its children.

That is ``len(prefix) + 10 + 100 + ... + 10**(digits-1)`` token evaluations, about |R| / 9: one
per internal node of the trie, the prefix's last token being the root (the last digit is never
fed: only its log-prob is read). Memory is bounded by ``digits * batch_size`` cached tokens,
whatever the number of digits.

The forward pass is written out here for GPT-2 blocks (transformers ``GPT2LMHeadModel``), reading
the model's own modules and weights. The tests check it against plain full-sequence scoring.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

N_DIGITS = 10


def trie_token_count(prefix_len: int, digits: int) -> int:
    """Token evaluations of :func:`trie_candidate_logprobs`: the prefix once, then one per internal node."""
    return prefix_len + sum(10 ** k for k in range(1, digits))


def full_token_count(prefix_len: int, digits: int) -> int:
    """Token evaluations of scoring every full candidate sequence (prefix and all digits)."""
    return 10 ** digits * (prefix_len + digits)


class _Gpt2Trie:
    """GPT-2 forward pieces for the trie: a causal prefix pass and a one-token-per-node step."""

    def __init__(self, model: torch.nn.Module, digit_ids: list[int]):
        tr = getattr(model, "transformer", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if tr is None or head is None or not all(hasattr(tr, a) for a in ("wte", "wpe", "h", "ln_f")):
            raise TypeError(f"trie scoring supports GPT-2 language models (GPT2LMHeadModel), "
                            f"not {type(model).__name__}")
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise TypeError("trie scoring does not support GPT-2 models with cross-attention")
        self.tr, self.head = tr, head
        self.n_head = cfg.n_head
        self.d_model = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.n_positions = cfg.n_positions
        self.vocab = cfg.vocab_size
        self.device = tr.wte.weight.device
        self.scalings = [self._scaling(block.attn, i, cfg) for i, block in enumerate(tr.h)]
        self.fast_gelu = getattr(cfg, "activation_function", None) == "gelu_new"
        self.digit_ids = torch.as_tensor(digit_ids, dtype=torch.long, device=self.device)

    def _scaling(self, attn: torch.nn.Module, layer: int, cfg) -> float:
        if hasattr(attn, "scaling"):
            return float(attn.scaling)
        s = self.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        return s / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else s

    def _mlp(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        mlp = block.mlp
        h = mlp.c_fc(x)
        # gelu_new is exactly the tanh approximation; one fused kernel instead of seven.
        h = F.gelu(h, approximate="tanh") if self.fast_gelu else mlp.act(h)
        return mlp.c_proj(h)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[n, d_model] -> [heads, n, head_dim]."""
        return t.view(t.shape[0], self.n_head, self.head_dim).transpose(0, 1)

    def _digit_logprobs(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_model] last hidden states -> [n, 10] log-probs of the digit tokens (full-vocab softmax)."""
        logits = self.head(self.tr.ln_f(x)).float()
        return logits.index_select(1, self.digit_ids) - torch.logsumexp(logits, dim=1, keepdim=True)

    def prefix(self, prefix_ids: list[int]):
        """Run the prefix once: per-layer keys/values [heads, P, head_dim] and the first digit's log-probs."""
        ids = torch.as_tensor(prefix_ids, dtype=torch.long, device=self.device)
        pos = torch.arange(len(prefix_ids), device=self.device)
        x = self.tr.wte(ids) + self.tr.wpe(pos)
        keys, values = [], []
        for block, scale in zip(self.tr.h, self.scalings):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.d_model, dim=1)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            x = x + block.attn.c_proj(o.transpose(0, 1).reshape(len(prefix_ids), self.d_model))
            x = x + self._mlp(block, block.ln_2(x))
            keys.append(k.contiguous())
            values.append(v.contiguous())
        return keys, values, self._digit_logprobs(x[-1:])[0]

    def step(self, tokens: torch.Tensor, position: int, prefix_kv, node_kv):
        """Feed one token per node (all at `position`).

        prefix_kv: per-layer (K, V) [heads, P, head_dim], shared by every node.
        node_kv: per-layer (K, V) [heads, n, j, head_dim], each node's ancestors' digit tokens (j may be 0).
        Returns the [n, 10] next-digit log-probs and node_kv extended by this token ([heads, n, j+1, head_dim]).
        """
        n = tokens.shape[0]
        x = self.tr.wte(tokens) + self.tr.wpe.weight[position]
        new_kv = []
        for block, scale, (kp, vp), (kn, vn) in zip(self.tr.h, self.scalings, prefix_kv, node_kv):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.d_model, dim=1)
            q = self._split_heads(q) * scale                                  # [H, n, hd]
            kn = torch.cat([kn, self._split_heads(k).unsqueeze(2)], dim=2)    # [H, n, j+1, hd]
            vn = torch.cat([vn, self._split_heads(v).unsqueeze(2)], dim=2)
            scores = torch.cat([torch.bmm(q, kp.transpose(1, 2)),             # [H, n, P], prefix broadcast
                                torch.matmul(kn, q.unsqueeze(-1)).squeeze(-1)], dim=2)  # [H, n, j+1]
            att = torch.softmax(scores, dim=2)
            p = kp.shape[1]
            o = torch.bmm(att[:, :, :p], vp) + torch.matmul(att[:, :, None, p:], vn).squeeze(2)
            x = x + block.attn.c_proj(o.transpose(0, 1).reshape(n, self.d_model))
            x = x + self._mlp(block, block.ln_2(x))
            new_kv.append((kn, vn))
        return self._digit_logprobs(x), new_kv


def _check_args(model, prefix_ids, digit_ids, digits, batch_size) -> None:
    if len(prefix_ids) < 1:
        raise ValueError("the canary prefix must hold at least one token (BOS)")
    if len(digit_ids) != N_DIGITS or len(set(int(i) for i in digit_ids)) != N_DIGITS:
        raise ValueError(f"digit_ids must be 10 distinct token ids (one per digit), got {list(digit_ids)}")
    if not isinstance(digits, (int, np.integer)) or isinstance(digits, bool) or digits < 1:
        raise ValueError(f"digits must be a positive integer, got {digits!r}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    vocab = model.config.vocab_size
    bad = [int(i) for i in list(prefix_ids) + list(digit_ids) if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the model's vocabulary (size {vocab})")
    limit = model.config.n_positions
    if len(prefix_ids) + digits > limit:
        raise ValueError(f"a candidate has {len(prefix_ids)} + {digits} tokens, more than the model's "
                         f"{limit} positions")


def trie_candidate_logprobs(model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int], digits: int,
                            batch_size: int = 4096) -> np.ndarray:
    """ll (nats) of every candidate's digit tokens given the prefix: float64 array [10**digits], index = number.

    The same numbers as scoring each ``prefix_ids + digits`` sequence in full (up to float32
    rounding), at about 1/9 token evaluation per candidate instead of ``len(prefix) + digits``.
    ``batch_size`` is the most trie nodes fed in one forward pass (memory grows with it).
    The model is put in eval mode for the call and restored afterwards.
    """
    if not hasattr(model, "config"):
        raise TypeError(f"trie scoring supports GPT-2 language models (GPT2LMHeadModel), not {type(model).__name__}")
    _check_args(model, prefix_ids, digit_ids, digits, batch_size)
    net = _Gpt2Trie(model, [int(i) for i in digit_ids])
    was_training = model.training
    model.eval()
    out = np.empty(10 ** digits, dtype=np.float64)
    try:
        with torch.inference_mode():
            _score_trie(net, [int(i) for i in prefix_ids], digits, int(batch_size), out)
    finally:
        model.train(was_training)
    return out


def _score_trie(net: _Gpt2Trie, prefix_ids: list[int], digits: int, batch_size: int, out: np.ndarray) -> None:
    keys, values, first = net.prefix(prefix_ids)
    prefix_kv = list(zip(keys, values))
    p = len(prefix_ids)
    if digits == 1:
        out[:] = first.double().cpu().numpy()
        return
    dev, dt = net.device, keys[0].dtype
    empty = torch.empty(net.n_head, N_DIGITS, 0, net.head_dim, device=dev, dtype=dt)
    root_kv = [(empty, empty)] * len(keys)
    children_tokens = net.digit_ids  # the token of child d is digit_ids[d]

    def visit(depth: int, start: int, ll: torch.Tensor, kv) -> None:
        """Nodes start .. start+n-1 at `depth` (their values as numbers); ll [n]; kv of their ancestors.

        Feeds each node's last digit, then writes (last level) or visits (deeper) its children,
        which are the numbers 10*start .. 10*(start+n)-1 in order.
        """
        n = ll.shape[0]
        tokens = children_tokens[torch.arange(start, start + n, device=dev) % N_DIGITS]
        lp, node_kv = net.step(tokens, p + depth - 1, prefix_kv, kv)
        child_ll = (ll.unsqueeze(1).double() + lp.double()).reshape(-1)
        if depth + 1 == digits:
            out[N_DIGITS * start: N_DIGITS * (start + n)] = child_ll.cpu().numpy()
            return
        for c in range(0, N_DIGITS * n, batch_size):
            idx = torch.arange(c, min(c + batch_size, N_DIGITS * n), device=dev)
            parent = idx // N_DIGITS
            sub_kv = [(k.index_select(1, parent), v.index_select(1, parent)) for k, v in node_kv]
            visit(depth + 1, N_DIGITS * start + c, child_ll.index_select(0, idx), sub_kv)

    for c in range(0, N_DIGITS, batch_size):
        e = min(c + batch_size, N_DIGITS)
        visit(1, c, first[c:e].double(), [(k[:, c:e], v[:, c:e]) for k, v in root_kv])
