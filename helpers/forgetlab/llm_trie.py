"""Exact canary candidate log-likelihoods on a Llama model (SmolLM2), scored as a digit trie.

Exact exposure needs ll(r) for all ``10**digits`` candidate secrets r of a canary template. Scoring every
candidate (or every (digits-1)-digit path, :func:`forgetlab.canaries.candidate_logprobs_shared_last`) runs
``10**(digits-1) * (len(prefix) + digits)`` tokens through the model and the vocabulary head. The candidates form a
trie, though: each node at depth k (a k-digit string) needs one next-token distribution, and a child's ll is its
parent's plus one log-prob. So here:

- the prefix is fed once; the nodes are fed level by level, one token per node (its last digit), attending to the
  prefix's and its ancestors' keys and values: ``len(prefix) + 10 + 100 + ... + 10**(digits-1)`` tokens, about
  ``|R| / 9``, and as many head evaluations (the vocabulary head costs more than SmolLM2's six trained blocks);
- the frozen first blocks (embeddings and blocks below ``llm_train_layers``) never change, so their output at every
  trie node is computed once (:class:`LlamaCandidateTrie`) and each call runs the trained blocks only.

The block is written out from the model's own modules (RMSNorm, projections, rotary embedding, grouped-query eager
attention, MLP), as transformers' ``LlamaDecoderLayer`` computes it; tests/test_llm.py checks it against full
scoring. Same numbers as full scoring up to float32 rounding.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

N_DIGITS = 10
HEAD_ROWS = 256             # trie nodes per vocabulary-head chunk ([256, 49152] float32 logits: 50 MB)
NODE_CHUNK = 2048           # trie nodes per attention chunk (bounds the gathered ancestor keys and values)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class LlamaCandidateTrie:
    """Candidate lls of one canary template on one Llama model whose first ``n_frozen`` blocks never change.

    Call it with the model (at any trained weights) to get the ll of every candidate, index = the number.
    """

    def __init__(self, model: torch.nn.Module, prefix_ids: list[int], digit_ids: list[int], digits: int,
                 n_frozen: int = 0):
        if type(model).__name__ != "LlamaForCausalLM":
            raise TypeError(f"the Llama trie scores LlamaForCausalLM models, not {type(model).__name__}")
        if not 1 <= digits <= 9:
            raise ValueError(f"digits = {digits} must be 1 to 9")
        if len(digit_ids) != N_DIGITS or len(prefix_ids) < 1:
            raise ValueError("pass the ten digit token ids and a prefix of at least one token (the start token)")
        layers = model.model.layers
        if not 0 <= n_frozen <= len(layers):
            raise ValueError(f"n_frozen = {n_frozen} but the model has {len(layers)} blocks")
        frozen = [model.model.embed_tokens, *layers[:n_frozen]]
        if any(p.requires_grad for m in frozen for p in m.parameters()):
            raise ValueError("the trie keeps the frozen blocks' output: freeze the embeddings and the first "
                             f"{n_frozen} blocks (llm_finetune.freeze_except)")
        self.prefix = [int(t) for t in prefix_ids]
        self.digit_ids = [int(t) for t in digit_ids]
        self.digits, self.n_frozen = digits, n_frozen
        self._frozen: list[torch.Tensor] | None = None       # per level: frozen blocks' output [nodes, d]

    def token_count(self) -> int:
        """Tokens fed per call: the prefix once, then one per internal node of the trie."""
        return len(self.prefix) + sum(10 ** k for k in range(1, self.digits))

    def _inputs(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """Embeddings per level: the prefix [P, d], then level k's nodes [10**k, d] (each its last digit)."""
        emb = model.model.embed_tokens
        device = emb.weight.device
        digit = torch.as_tensor(self.digit_ids, dtype=torch.long, device=device)
        levels = [emb(torch.as_tensor(self.prefix, dtype=torch.long, device=device))]
        for k in range(1, self.digits):
            levels.append(emb(digit.repeat(10 ** (k - 1))))          # node i's last digit is i % 10
        return levels

    def _run_blocks(self, model: torch.nn.Module, blocks, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run ``blocks`` over the prefix and every trie level; inputs and outputs are per level as in _inputs."""
        p = len(self.prefix)
        device = levels[0].device
        positions = torch.arange(p + self.digits, device=device)[None]
        cos, sin = model.model.rotary_emb(levels[0], positions)         # [1, P + digits, head_dim]
        cos, sin = cos[0], sin[0]
        causal = torch.full((p, p), float("-inf"), device=device).triu(1)
        levels = list(levels)
        for block in blocks:
            attn = block.self_attn
            hd = attn.head_dim
            groups = attn.num_key_value_groups
            keys: list[torch.Tensor] = []      # per level: [1 (prefix) or nodes, kv_heads, P or 1, hd]
            values: list[torch.Tensor] = []
            for k, x in enumerate(levels):
                n, length = (1, p) if k == 0 else (x.shape[0], 1)
                h = block.input_layernorm(x).view(n, length, -1)
                pos = slice(0, p) if k == 0 else slice(p + k - 1, p + k)
                q = _rope(attn.q_proj(h).view(n, length, -1, hd).transpose(1, 2), cos[pos], sin[pos])
                keys.append(_rope(attn.k_proj(h).view(n, length, -1, hd).transpose(1, 2), cos[pos], sin[pos]))
                values.append(attn.v_proj(h).view(n, length, -1, hd).transpose(1, 2))
                out = torch.empty(n, length, q.shape[1] * hd, dtype=q.dtype, device=device)
                for c in range(0, n, NODE_CHUNK):
                    node = torch.arange(c, min(n, c + NODE_CHUNK), device=device)
                    # a node attends to the prefix, its ancestors (at level j: node // 10**(k - j)) and itself
                    kk = torch.cat([keys[0].expand(len(node), -1, -1, -1)]
                                   + [keys[j][node // 10 ** (k - j)] for j in range(1, k + 1)], dim=2)
                    vv = torch.cat([values[0].expand(len(node), -1, -1, -1)]
                                   + [values[j][node // 10 ** (k - j)] for j in range(1, k + 1)], dim=2)
                    scores = torch.matmul(q[node], kk.repeat_interleave(groups, dim=1).transpose(2, 3)) * attn.scaling
                    if k == 0:
                        scores = scores + causal
                    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                    out[node] = torch.matmul(weights, vv.repeat_interleave(groups, dim=1)).transpose(1, 2).reshape(
                        len(node), length, -1)
                y = x.view(n, length, -1) + attn.o_proj(out)
                y = y + block.mlp(block.post_attention_layernorm(y))
                levels[k] = y.view(x.shape)
        return levels

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        """ll (nats, float64) of every candidate's digits given the prefix: array [10**digits], index = number."""
        was_training = model.training
        model.eval()
        try:
            layers = model.model.layers
            if self._frozen is None:
                self._frozen = self._run_blocks(model, layers[:self.n_frozen], self._inputs(model))
            out = self._run_blocks(model, layers[self.n_frozen:], self._frozen)
            head, digit = model.get_output_embeddings(), torch.as_tensor(self.digit_ids, device=out[0].device)
            last = [out[0][-1:]] + out[1:]                       # the states that predict each next digit
            ll = np.zeros(1)
            for x in last:
                x = model.model.norm(x)
                lp = torch.cat([self._digit_logprobs(head, x[c:c + HEAD_ROWS], digit)
                                for c in range(0, len(x), HEAD_ROWS)])
                ll = (ll[:, None] + lp.double().cpu().numpy()).reshape(-1)     # children: parent * 10 + digit
            return ll
        finally:
            model.train(was_training)

    @staticmethod
    def _digit_logprobs(head: torch.nn.Module, x: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        """[n, d] final states -> [n, 10] log-probs of the digit tokens (softmax over the whole vocabulary)."""
        logits = head(x).float()
        return logits.index_select(1, digit) - torch.logsumexp(logits, dim=1, keepdim=True)
