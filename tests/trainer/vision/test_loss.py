"""Losses against float64 references; gather-with-grad on 2 gloo processes equals one process."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from l2c.trainer.vision.loss import ClipLoss, SigLipLoss


def _features(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def clip_reference(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    n = len(img)

    def ce(z):  # rows: -log softmax at the diagonal
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(n), np.arange(n)]))

    return (ce(logits) + ce(logits.T)) / 2


def siglip_reference(img: np.ndarray, txt: np.ndarray, scale: float, bias: float) -> float:
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T + bias
    labels = 2 * np.eye(len(img)) - 1
    return float(np.sum(np.log1p(np.exp(-labels * logits))) / len(img))


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_float64_reference(scale):
    img, txt = _features()
    got = ClipLoss()(img, txt, torch.tensor(scale))
    want = clip_reference(img.numpy(), txt.numpy(), scale)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-6)


def test_clip_loss_perfect_pairs_near_zero_and_chance_at_scale_zero():
    img, _ = _features()
    assert float(ClipLoss()(img, img, torch.tensor(100.0))) < 1e-3
    assert math.isclose(float(ClipLoss()(*_features(), torch.tensor(0.0))), math.log(12), rel_tol=1e-6)


def test_siglip_loss_matches_float64_reference():
    img, txt = _features()
    got = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    want = siglip_reference(img.numpy(), txt.numpy(), 10.0, -10.0)
    assert math.isclose(float(got), want, rel_tol=1e-5)


def test_logit_scale_clamped_at_100():
    from l2c.trainer.vision.model import L2CModel
    from l2c.trainer.vision.tower import ImageSpec

    tower = torch.nn.Module()
    tower.config = type("C", (), {"hidden_size": 4})()
    m = L2CModel(tower, ImageSpec(8, [8, 8], [0.5] * 3, [0.5] * 3), 4, 4, 1, 2, logit_scale_init=1 / 0.07)
    assert math.isclose(float(m.scale()), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(1000.0))
    assert float(m.scale()) == 100.0


# -- gather with grad: 2 real gloo processes vs one process on the concatenated batch -----------------


class TwoTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(6, 5)
        self.txt = torch.nn.Linear(7, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x, y):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1), self.logit_scale.exp()


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 7, generator=g)


def _loss(kind, gather):
    return ClipLoss(gather) if kind == "clip" else SigLipLoss(gather)


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _worker(rank, world, port, kind, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TwoTower())
        x, y = _batch()
        n = len(x) // world
        result = {}
        for gather in (True, False):
            model.zero_grad()
            img, txt, scale = model(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
            loss = _loss(kind, gather)(img, txt, scale, torch.tensor(-2.0) if kind == "siglip" else None)
            loss.backward()  # DDP averages the gradients over ranks
            result[gather] = {"grads": _grads(model.module), "loss": loss.detach()}
        torch.save(result, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(kind, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), kind, str(tmp_path)), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gather_with_grad_matches_single_process(kind, tmp_path):
    ref_model = TwoTower()
    x, y = _batch()
    img, txt, scale = ref_model(x, y)
    ref_loss = _loss(kind, True)(img, txt, scale, torch.tensor(-2.0) if kind == "siglip" else None)
    ref_loss.backward()
    ref = _grads(ref_model)

    results = _run_two(kind, tmp_path)
    ranks = [r[True] for r in results]
    # the mean of the local losses is the global loss ...
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref_loss.detach(), atol=1e-6)
    for r in ranks:  # ... and every rank holds the single-process gradients
        for k in ref:
            assert torch.allclose(r["grads"][k], ref[k], atol=1e-6, rtol=1e-5), k
    # without gradients through the gathered features they differ: the check has teeth
    assert not torch.allclose(results[0][False]["grads"]["txt.weight"], ref["txt.weight"], atol=1e-4)
