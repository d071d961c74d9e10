"""The training throughput choices (fused AdamW, native GELU kernel) train the same model as the plain loop."""
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from forgetlab.models import model_config
from forgetlab.training import lr_at, make_optimizer, native_gelu, train_lm, train_step

VOCAB, BLOCK, BATCH = 97, 16, 8


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(model_config(VOCAB, n_layer=2, n_head=2, d_model=32, block_size=BLOCK)).train()


def batches(n: int = 5) -> list[torch.Tensor]:
    """n steps cycling over two fixed batches (so the loss visibly falls within a few steps)."""
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randint(0, VOCAB, (BATCH, BLOCK), generator=gen) for _ in range(2)]
    return [pool[i % 2] for i in range(n)]


def plain_step(model, opt, x) -> float:
    """The version-1 loop body, written out: HF loss, backward, clip, step."""
    out = model(input_ids=x, labels=x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return out.loss.item()


def train_losses(fused: bool, fast_gelu: bool, steps: int = 5, lr: float = 3e-3) -> tuple[list[float], GPT2LMHeadModel]:
    model = tiny_model()
    opt = make_optimizer(model, lr, fused=fused)
    losses = []
    if fast_gelu:
        with native_gelu(model):
            losses = [train_step(model, opt, x, x) for x in batches(steps)]
    else:
        losses = [plain_step(model, opt, x) for x in batches(steps)]
    return losses, model


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


def test_fused_adamw_is_fused_and_matches_the_default_loop():
    model = tiny_model()
    assert make_optimizer(model, 1e-3).defaults["fused"] is True
    assert not make_optimizer(model, 1e-3, fused=False).defaults["fused"]
    ref, m_ref = train_losses(fused=False, fast_gelu=False)
    got, m_got = train_losses(fused=True, fast_gelu=False)
    assert ref[-1] < ref[0] - 0.01                # it does train
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert max_param_diff(m_got, m_ref) < 1e-4   # Adam divides by sqrt(v): rounding shows most on near-zero gradients


def test_native_gelu_is_the_same_function():
    model = tiny_model().eval()
    x = batches(1)[0]
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with native_gelu(model) as same:
            assert same is model
            assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
            got = model(input_ids=x).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)
    h = torch.linspace(-8, 8, 10001)
    assert torch.allclose(torch.nn.GELU(approximate="tanh")(h), NewGELUActivation()(h), rtol=0, atol=1e-6)


def test_native_gelu_restores_the_modules_even_after_an_error():
    model = tiny_model()
    before = [type(b.mlp.act) for b in model.transformer.h]
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with native_gelu(model):
            assert all(isinstance(b.mlp.act, torch.nn.GELU) for b in model.transformer.h)
            raise RuntimeError("boom")
    assert [type(b.mlp.act) for b in model.transformer.h] == before == [NewGELUActivation] * 2
    assert list(model.state_dict()) == keys


def test_both_speedups_together_train_the_same_losses():
    ref, m_ref = train_losses(fused=False, fast_gelu=False)
    got, m_got = train_losses(fused=True, fast_gelu=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert max_param_diff(m_got, m_ref) < 1e-4   # Adam divides by sqrt(v): rounding shows most on near-zero gradients


def test_train_lm_matches_the_plain_version_1_loop():
    """train_lm (fused AdamW, native GELU) against the old loop written out, same seed and batch order."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randint(0, VOCAB, (40, BLOCK), generator=gen).numpy()
    labels = rows.copy()
    labels[:, :3] = -100
    kw = dict(epochs=1.0, batch_size=BATCH, learning_rate=3e-3, warmup_steps=2, seed=0)
    fast = tiny_model()
    curve = train_lm(fast, rows, labels, device=torch.device("cpu"), **kw)
    assert all(isinstance(b.mlp.act, NewGELUActivation) for b in fast.transformer.h)   # restored

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
        out = plain(input_ids=ids_t[b], labels=lab_t[b])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        ref.append(out.loss.item())
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
