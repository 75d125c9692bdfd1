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


# -- several captions per image, mined negatives, nested dims: against the formulas written out ------------------

OWNER = [0, 0, 1, 2, 2, 2, 3]  # image of each text: 2, 1, 3 and 1 captions
EXTRA_OWNER = [-1, 2, -1, 0, -1]  # image of each mined negative in the batch (-1: none)


def _multi(seed=3, d=6, dtype=torch.float64):
    """Leaf tensors: 4 images, 7 texts of `OWNER`, 5 extra texts, a logit scale and bias."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(4, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(len(OWNER), d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    extra = F.normalize(torch.randn(len(EXTRA_OWNER), d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return img, txt, extra, torch.tensor(7.0, dtype=dtype, requires_grad=True), torch.tensor(-2.0, dtype=dtype,
                                                                                              requires_grad=True)


def clip_by_hand(img, txt, extra, scale):
    """Multi-positive InfoNCE, one term at a time: image i against every text and the extra texts not of image i,
    the mean of -log p over its own texts; each text against every image."""
    n_img, n_txt = img.shape[0], txt.shape[0]
    i2t = []
    for i in range(n_img):
        gallery = [scale * torch.dot(img[i], txt[t]) for t in range(n_txt)]
        gallery += [scale * torch.dot(img[i], extra[m]) for m in range(extra.shape[0]) if EXTRA_OWNER[m] != i]
        log_denominator = torch.log(sum(torch.exp(z) for z in gallery))
        own = [t for t in range(n_txt) if OWNER[t] == i]
        i2t.append(sum(log_denominator - scale * torch.dot(img[i], txt[t]) for t in own) / len(own))
    t2i = []
    for t in range(n_txt):
        log_denominator = torch.log(sum(torch.exp(scale * torch.dot(txt[t], img[b])) for b in range(n_img)))
        t2i.append(log_denominator - scale * torch.dot(txt[t], img[OWNER[t]]))
    return (sum(i2t) / n_img + sum(t2i) / n_txt) / 2


def siglip_by_hand(img, txt, extra, scale, bias):
    """Every (image, text) pair a binary decision, +1 for an image's own texts; extras -1 unless they are of
    that image (left out); the sum over pairs divided by the images."""
    total = 0.0
    for i in range(img.shape[0]):
        for t in range(txt.shape[0]):
            z = scale * torch.dot(img[i], txt[t]) + bias
            total = total + torch.log1p(torch.exp(-z if OWNER[t] == i else z))
        for m in range(extra.shape[0]):
            if EXTRA_OWNER[m] != i:
                total = total + torch.log1p(torch.exp(scale * torch.dot(img[i], extra[m]) + bias))
    return total / img.shape[0]


def _value_and_grads(fn, leaves):
    loss = fn()
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_multi_positive_loss_with_negatives_equals_the_formula_values_and_gradients(kind):
    img, txt, extra, scale, bias = _multi()
    leaves = [img, txt, extra, scale] + ([bias] if kind == "siglip" else [])
    owner, extra_owner = torch.tensor(OWNER), torch.tensor(EXTRA_OWNER)
    if kind == "clip":
        got = _value_and_grads(lambda: ClipLoss()(img, txt, scale, None, owner, extra, extra_owner), leaves)
        want = _value_and_grads(lambda: clip_by_hand(img, txt, extra, scale), leaves)
    else:
        got = _value_and_grads(lambda: SigLipLoss()(img, txt, scale, bias, owner, extra, extra_owner), leaves)
        want = _value_and_grads(lambda: siglip_by_hand(img, txt, extra, scale, bias), leaves)
    assert torch.allclose(got[0], want[0], rtol=1e-10), (got[0], want[0])
    for g, w in zip(got[1], want[1], strict=True):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
    assert all(float(g.abs().sum()) > 0 for g in got[1])  # every input moves the loss


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_one_caption_per_image_is_todays_loss(kind):
    img, txt = _features()
    loss = _loss(kind, True)
    bias = torch.tensor(-3.0) if kind == "siglip" else None
    today = loss(img, txt, torch.tensor(10.0), bias)
    assert torch.allclose(loss(img, txt, torch.tensor(10.0), bias, torch.arange(len(img))), today, rtol=1e-6)


def test_nested_loss_is_the_sum_over_renormalised_prefixes():
    from l2c.trainer.vision.loss import NestedLoss, make_loss, nested_dims

    g = torch.Generator().manual_seed(5)
    img = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)  # before normalisation
    txt = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(5.0, dtype=torch.float64)
    dims = nested_dims([2, 4], 8)
    assert dims == [2, 4, 8] and nested_dims([], 8) == [] and isinstance(make_loss("clip", True, dims), NestedLoss)

    def by_hand():
        total = 0.0
        for d in (2, 4, 8):
            a = img[:, :d] / img[:, :d].norm(dim=1, keepdim=True)
            b = txt[:, :d] / txt[:, :d].norm(dim=1, keepdim=True)
            z = scale * a @ b.T
            total = total + (-(torch.diagonal(z) - torch.logsumexp(z, 1)).mean()
                             - (torch.diagonal(z) - torch.logsumexp(z, 0)).mean()) / 2  # fmt: skip
        return total

    loss = make_loss("clip", True, dims)
    got = _value_and_grads(lambda: loss(img, txt, scale).double(), [img, txt])
    want = _value_and_grads(by_hand, [img, txt])
    assert torch.allclose(got[0], want[0], rtol=1e-6)
    for g_, w in zip(got[1], want[1], strict=True):
        assert torch.allclose(g_.double(), w, rtol=1e-5, atol=1e-7)


# -- several captions per image on 2 gloo processes, each rank holding another number of texts ------------------

SPLIT = {0: ([0, 1], [0, 1, 2], [0, 1]), 1: ([2, 3], [3, 4, 5, 6], [2, 3, 4])}  # rank: images, texts, extras
LOCAL_EXTRA_OWNER = [-1, 1, -1, 2, -1]  # each extra's image, one of its own rank's (global index)


def _multi_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 6, generator=g), torch.randn(len(OWNER), 7, generator=g), torch.randn(5, 7, generator=g)


def _multi_forward(model, x, y, ye):
    """One pass over an image's texts and the extra texts, split after (as train_step does)."""
    img, txt, scale = model(x, torch.cat([y, ye]))
    return img, txt[: len(y)], txt[len(y) :], scale


def _multi_worker(rank, world, port, kind, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TwoTower())
        x, y, ye = _multi_inputs()
        imgs, txts, extras = SPLIT[rank]
        first = imgs[0]
        owner = torch.tensor([OWNER[t] - first for t in txts])
        extra_owner = torch.tensor([LOCAL_EXTRA_OWNER[m] - first if LOCAL_EXTRA_OWNER[m] >= 0 else -1 for m in extras])
        img, txt, extra, scale = _multi_forward(model, x[imgs], y[txts], ye[extras])
        loss = _loss(kind, True)(img, txt, scale, torch.tensor(-2.0) if kind == "siglip" else None, owner, extra,
                                 extra_owner)  # fmt: skip
        loss.backward()
        torch.save({"grads": _grads(model.module), "loss": loss.detach()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_several_captions_gathered_from_ranks_of_unequal_counts_match_one_process(kind, tmp_path):
    ref_model = TwoTower()
    img, txt, extra, scale = _multi_forward(ref_model, *_multi_inputs())
    ref_loss = _loss(kind, True)(img, txt, scale, torch.tensor(-2.0) if kind == "siglip" else None,
                                 torch.tensor(OWNER), extra, torch.tensor(LOCAL_EXTRA_OWNER))  # fmt: skip
    ref_loss.backward()
    ref = _grads(ref_model)
    mp.start_processes(_multi_worker, args=(2, _free_port(), kind, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref_loss.detach(), atol=1e-6)
    for r in ranks:
        for k in ref:
            assert torch.allclose(r["grads"][k], ref[k], atol=1e-6, rtol=1e-5), k
