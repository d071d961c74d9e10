"""The tiny language model: a GPT-2 architecture from transformers (its tokenizer is in :mod:`forgetlab.tokenizer`)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

# The tokenizer lives with the data (forgetlab.tokenizer); re-exported here for code that still imports it from
# models (tests/test_metrics.py, tests/test_exposure_trie.py) until they import it from forgetlab.tokenizer.
from .tokenizer import BOS, bos_id, decode, encode, train_tokenizer  # noqa: F401

hf_logging.set_verbosity_error()


def model_config(vocab_size: int, n_layer: int, n_head: int, d_model: int, block_size: int,
                 bos: int = 0) -> GPT2Config:
    """GPT-2 config without dropout (unlearning curves must be deterministic) and with the exact GELU.

    GPT-2 itself uses ``gelu_new``, the tanh approximation of GELU. The two curves differ by at most 5e-4;
    on CPU torch's erf kernel runs 2.5 times faster than its tanh one (forward and backward together), which
    makes a training step of the default model about 5% faster (benchmarks/bench_training.py).
    """
    return GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=d_model, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu",
                      bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, tie_word_embeddings=True)


def build_model(config: GPT2Config, seed: int) -> GPT2LMHeadModel:
    seed_everything(seed)
    return GPT2LMHeadModel(config)


def model_from_tensors(config: GPT2Config, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"
                       ) -> GPT2LMHeadModel:
    """A tiny GPT-2 from cached weights (tied embeddings re-tied), in eval mode on `device`."""
    model = GPT2LMHeadModel(config)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.to(device).eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA GPU is visible: set device to 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Fix every random generator and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=False)


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tok: Tokenizer, prompts: list[str], max_new_tokens: int = 40,
                     temperature: float = 0.8, seed: int = 0) -> list[str]:
    """Sampled continuations (fixed seed, so reruns print the same text)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    limit = model.config.n_positions
    outputs = []
    for prompt in prompts:
        ids = [tok.token_to_id(BOS)] + encode(tok, prompt)
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids[-limit:]], device=device)).logits[0, -1].float().cpu()
            probs = torch.softmax(logits / temperature, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        outputs.append(decode(tok, ids[1:]))
    return outputs
