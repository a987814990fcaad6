"""Multi-scale symmetric InfoNCE: symmetry, minimum at alignment, gradients, DDP gather."""

from __future__ import annotations

import math

import pytest
import torch

from _models_data import one_thread
from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.loss import (
    MAX_LOGIT_SCALE,
    info_nce,
    logit_scale_value,
    multiscale_loss,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


LOG_1_OVER_007 = math.log(1 / 0.07)


def _pair(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_reference_value():
    a, b = _pair()
    got = info_nce(a, b, LOG_1_OVER_007)
    an = a / a.norm(dim=1, keepdim=True)
    bn = b / b.norm(dim=1, keepdim=True)
    sim = an @ bn.t() / 0.07
    ref_ab = -(sim.diag() - sim.logsumexp(dim=1)).mean()
    ref_ba = -(sim.diag() - sim.logsumexp(dim=0)).mean()
    assert torch.allclose(got, 0.5 * (ref_ab + ref_ba), atol=1e-5)


def test_symmetric_in_the_two_modalities():
    a, b = _pair()
    assert torch.allclose(info_nce(a, b, 2.0), info_nce(b, a, 2.0), atol=1e-6)
    img = {"micro": a, "macro": b}
    st = {"micro": b, "macro": a}
    t1, p1 = multiscale_loss(img, st, ("micro", "macro"), 2.0)
    t2, p2 = multiscale_loss(st, img, ("micro", "macro"), 2.0)
    assert torch.allclose(t1, t2, atol=1e-6)
    assert p1 == pytest.approx(p2, abs=1e-6)


def test_minimum_at_perfect_alignment():
    a, _ = _pair(n=16)
    noisy = a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    aligned = info_nce(a, noisy, LOG_1_OVER_007)
    shuffled = info_nce(
        a, noisy[torch.randperm(16, generator=torch.Generator().manual_seed(2))], LOG_1_OVER_007
    )
    assert aligned < shuffled
    assert aligned < math.log(16) < shuffled  # chance level is log N
    # orthogonal unit embeddings at the lowest temperature (τ = 0.01): loss → log(1) = 0
    eye = torch.eye(8, 32)
    low = info_nce(eye, eye * 3.0, MAX_LOGIT_SCALE)  # scale-invariant (cosine)
    assert low.item() == pytest.approx(0.0, abs=1e-6)
    # and the temperature is clamped: a larger logit scale is the same as τ = 0.01
    assert torch.allclose(info_nce(eye, eye, 50.0), low)
    assert logit_scale_value(torch.tensor(50.0)).item() == pytest.approx(100.0)
    assert logit_scale_value(torch.tensor(-3.0)).item() == pytest.approx(1.0)


def test_gradcheck_and_temperature_gradient():
    a, b = _pair(n=5, d=6)
    a = a.double().requires_grad_(True)
    b = b.double().requires_grad_(True)
    ls = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: info_nce(x, y, s), (a, b, ls))
    loss = info_nce(a, b, ls)
    loss.backward()
    assert ls.grad is not None and ls.grad != 0


def test_multiscale_total_is_the_sum_and_single_scale_ablation():
    img = {s: _pair(seed=i)[0] for i, s in enumerate(("micro", "meso", "macro"))}
    st = {s: _pair(seed=i)[1] for i, s in enumerate(("micro", "meso", "macro"))}
    total, parts = multiscale_loss(img, st, ("micro", "meso", "macro"), 2.0)
    assert set(parts) == {"micro", "meso", "macro"}
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-6)
    for s in parts:
        assert parts[s] == pytest.approx(info_nce(img[s], st[s], 2.0).item(), rel=1e-6)
    macro, mparts = multiscale_loss(img, st, ("macro",), 2.0)
    assert list(mparts) == ["macro"] and macro.item() == pytest.approx(parts["macro"])
    with pytest.raises(SigmmaError, match="missing"):
        multiscale_loss({"macro": img["macro"]}, st, ("micro",), 2.0)
    with pytest.raises(SigmmaError):
        info_nce(img["macro"], st["macro"][:3], 2.0)


def _ddp_worker(rank: int, world: int, folder: str, a, b, ls) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world
    )
    try:
        n = a.shape[0] // world
        la = a[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        lb = b[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = info_nce(la, lb, ls)
        loss.backward()
        torch.save({"loss": loss.detach(), "ga": la.grad, "gb": lb.grad}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_gather_matches_the_global_batch(tmp_path):
    """Two gloo processes, 4 rows each: the mean of their losses is the full-batch loss and
    the summed gradients (what DDP all-reduces, ×world) match, i.e. the gather keeps the
    gradients of the other process's embeddings."""
    import torch.multiprocessing as mp

    world = 2
    a, b = _pair(n=8, d=6, seed=3)
    ls = 1.2
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, world, str(tmp_path), a, b, ls))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    results = [(r["loss"].item(), r["ga"], r["gb"]) for r in results]
    full_a, full_b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    full = info_nce(full_a, full_b, ls)
    full.backward()
    mean_loss = sum(r[0] for r in results) / world
    assert mean_loss == pytest.approx(full.item(), rel=1e-5)
    # each process's gradient w.r.t. its own rows, averaged over processes the way DDP
    # averages parameter gradients, equals the full-batch gradient
    ga = torch.cat([r[1] for r in results]) / world
    gb = torch.cat([r[2] for r in results]) / world
    # local grads only see the local loss; the other process's loss reaches these rows
    # through all_gather's backward (which sums over processes)
    assert torch.allclose(ga, full_a.grad, atol=1e-5)
    assert torch.allclose(gb, full_b.grad, atol=1e-5)
