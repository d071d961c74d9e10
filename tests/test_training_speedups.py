"""The training throughput choices (fused AdamW, the chunked LM head + cross-entropy) train the same model as
the plain loop (the model's own loss, torch's default AdamW)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from forgetlab.models import model_config
from forgetlab.training import (LinearCrossEntropy, lr_at, make_optimizer, next_token_loss,
                                train_lm, train_step)

VOCAB, BLOCK, BATCH = 97, 16, 8


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(model_config(VOCAB, n_layer=2, n_head=2, d_model=32, block_size=BLOCK)).train()


def batches(n: int = 5) -> list[torch.Tensor]:
    """n steps cycling over two fixed batches (so the loss visibly falls within a few steps)."""
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randint(0, VOCAB, (BATCH, BLOCK), generator=gen) for _ in range(2)]
    return [pool[i % 2] for i in range(n)]


def plain_step(model, opt, x, labels=None) -> float:
    """The version-1 loop body, written out: the model's own loss, backward, clip, step."""
    out = model(input_ids=x, labels=x if labels is None else labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return out.loss.item()


def train_losses(fused: bool, chunked_loss: bool, steps: int = 5, lr: float = 3e-3) -> tuple[list[float], GPT2LMHeadModel]:
    model = tiny_model()
    opt = make_optimizer(model, lr, fused=fused)
    if chunked_loss:
        return [train_step(model, opt, x, x) for x in batches(steps)], model
    return [plain_step(model, opt, x) for x in batches(steps)], model


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


def test_fused_adamw_is_fused_and_matches_the_default_loop():
    model = tiny_model()
    assert make_optimizer(model, 1e-3).defaults["fused"] is True
    assert not make_optimizer(model, 1e-3, fused=False).defaults["fused"]
    ref, m_ref = train_losses(fused=False, chunked_loss=False)
    got, m_got = train_losses(fused=True, chunked_loss=False)
    assert ref[-1] < ref[0] - 0.01                # it does train
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert max_param_diff(m_got, m_ref) < 1e-4   # Adam divides by sqrt(v): rounding shows most on near-zero gradients


def test_linear_cross_entropy_by_hand():
    """Rows e1, e2 (and an ignored third) against a 3-token head: logits [0, ln 2, 0] and [0, 0, ln 3].
    Losses -ln(2/4) and -ln(1/5), mean ln(10)/2; the first row's logit gradient is (softmax - onehot)/2 =
    [1/8, -1/4, 1/8], so its hidden gradient is that times W: [-ln(2)/4, ln(3)/8]."""
    ln2, ln3 = math.log(2), math.log(3)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [ln2, 0.0], [0.0, ln3]], requires_grad=True)
    targets = torch.tensor([1, 0, -100])
    loss = LinearCrossEntropy.apply(hidden, weight, targets, 1)      # one row per chunk
    assert loss.item() == pytest.approx(math.log(10) / 2, abs=1e-6)
    loss.backward()
    assert hidden.grad[0].tolist() == pytest.approx([-ln2 / 4, ln3 / 8], abs=1e-6)
    assert hidden.grad[2].tolist() == [0.0, 0.0]                     # ignored row: no gradient
    # weight gradient: sum over kept rows of (logit gradient)^T hidden; row 2's is ([1/5, 1/5, 3/5] - e0)/2
    expect = torch.tensor([[1 / 8, -0.4], [-1 / 4, 0.1], [1 / 8, 0.3]])
    assert torch.allclose(weight.grad, expect, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_matches_full_logits(chunk):
    gen = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(50, 16, generator=gen), torch.randn(40, 16, generator=gen)
    targets = torch.randint(0, 40, (50,), generator=gen)
    targets[::4] = -100
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = F.cross_entropy(h @ w.T, targets)
    (ref * 3).backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    got = LinearCrossEntropy.apply(h2, w2, targets, chunk)
    (got * 3).backward()                                             # the incoming gradient is applied
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(h2.grad, h.grad, atol=1e-6) and torch.allclose(w2.grad, w.grad, atol=1e-6)


def test_linear_cross_entropy_with_nothing_to_predict_is_zero():
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    loss = LinearCrossEntropy.apply(h, w, torch.full((4,), -100), 2)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


def test_linear_cross_entropy_with_a_frozen_head_gives_the_hidden_gradient_only():
    gen = torch.Generator().manual_seed(1)
    h0, w = torch.randn(9, 4, generator=gen), torch.randn(6, 4, generator=gen)
    targets = torch.randint(0, 6, (9,), generator=gen)
    h = h0.clone().requires_grad_()
    F.cross_entropy(h @ w.T, targets).backward()
    h2 = h0.clone().requires_grad_()
    LinearCrossEntropy.apply(h2, w, targets, 4).backward()
    assert w.grad is None and torch.allclose(h2.grad, h.grad, atol=1e-6)


def test_next_token_loss_is_the_models_own_loss():
    model = tiny_model()
    x = batches(1)[0]
    labels = x.clone()
    labels[:, :5] = -100
    ref = model(input_ids=x, labels=labels).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = next_token_loss(model, x, labels)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, g in zip(model.parameters(), ref_grads):   # the tied embedding gets both its gradients
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_both_speedups_together_train_the_same_losses():
    ref, m_ref = train_losses(fused=False, chunked_loss=False)
    got, m_got = train_losses(fused=True, chunked_loss=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert max_param_diff(m_got, m_ref) < 1e-4   # Adam divides by sqrt(v): rounding shows most on near-zero gradients


def test_train_lm_matches_the_plain_version_1_loop():
    """train_lm (fused AdamW, chunked loss) against the plain loop written out, same seed and batch order."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randint(0, VOCAB, (40, BLOCK), generator=gen).numpy()
    labels = rows.copy()
    labels[:, :3] = -100
    kw = dict(epochs=1.0, batch_size=BATCH, learning_rate=3e-3, warmup_steps=2, seed=0)
    fast = tiny_model()
    curve = train_lm(fast, rows, labels, device=torch.device("cpu"), **kw)

    plain = tiny_model()
    steps = len(rows) // BATCH
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(steps * BATCH // len(rows) + 2)])
    opt = torch.optim.AdamW(plain.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)   # torch default
    ids_t, lab_t = torch.from_numpy(rows), torch.from_numpy(labels)
    ref = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 3e-3, 2)
        b = order[step * BATCH:(step + 1) * BATCH]
        ref.append(plain_step(plain, opt, ids_t[b], lab_t[b]))
    np.testing.assert_allclose(curve[curve.split == "train"].loss.to_numpy(), ref, rtol=0, atol=1e-5)
    assert max_param_diff(fast, plain) < 1e-4   # Adam divides by sqrt(v): rounding shows most on near-zero gradients


def test_train_lm_is_bitwise_reproducible_with_the_speedups():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, VOCAB, (24, BLOCK), generator=gen).numpy()
    a, b = tiny_model(), tiny_model()
    for m in (a, b):
        train_lm(m, rows, rows, epochs=1.0, batch_size=BATCH, learning_rate=3e-3, warmup_steps=1, seed=0,
                 device=torch.device("cpu"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
