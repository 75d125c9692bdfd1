"""Contrastive losses: symmetric CLIP InfoNCE and SigLIP's sigmoid loss, local loss + gather with grad.

A step's texts may be more than one per image (`loss.positives=all`): `owner[t]` is the batch image of text t,
and every text of an image is its positive. Image→text is then multi-positive InfoNCE, the mean over an
image's positives of -log softmax (SupCon's L_out; with one text per image, CLIP's loss); text→image is each
text against the batch's images. SigLIP labels every (image, own text) pair +1. Mined hard negatives
(`extra`, texts of other images) join the image→text gallery only; an extra text whose image is in the
batch (`extra_owner[m]` >= 0) is left out for that image, never its negative (the batch of its own rank: one
whose image sits on another rank stays a negative, a chance of about W·B / keys per negative).

Cost of `positives=all` with K captions per image, per rank of batch B on W ranks: the adapter runs on B·K
vectors, so its activations and its share of the step grow K-fold. With a tower that trains that share is small:
a 4-block adapter on 4096-dim vectors is ~1.6 GFLOP per vector forward and backward, a ViT-L/14 at 336 px
~570 GFLOP per image, so K=5 adds about 1.4% to a step (K=2, the official short + dense captions, 0.3%). With a
frozen tower from caches (`--image-cache`) the adapter is most of the step, and its time grows about K-fold.
The logits are B × W·B·K (image→text) and B·K × W·B (text→image): at B=512, W=64, K=2, 134 MB each in fp32, as
much again for each softmax and its gradient; the all-gather moves K times the text features. On the photo demo
(B=128, K=5, a 2-block adapter on 384 dims) docs/results.md gives the measured CPU time per run.

`nested` (Matryoshka, `model.nested_dims`): the loss is summed over prefixes of the joint embedding, each
prefix re-normalised; the full embedding is always one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from l2c.trainer.distributed import gather_no_grad, gather_with_grad, rank, world_size


def gather_rows(x: torch.Tensor, gather, fill: float = 0.0) -> torch.Tensor:
    """`gather(x)` for ranks holding different numbers of rows: padded to the largest, gathered, unpadded."""
    if world_size() == 1:
        return x
    sizes = gather_no_grad(torch.tensor([x.shape[0]], device=x.device))
    most = int(sizes.max())
    pad = x.new_full((most - x.shape[0], *x.shape[1:]), fill)
    every = gather(torch.cat([x, pad])).view(world_size(), most, *x.shape[1:])
    return torch.cat([every[r, : int(n)] for r, n in enumerate(sizes)])


class _Step:
    """One step's features as each rank's loss sees them: its own rows, everything gathered, global owners."""

    def __init__(self, img, txt, owner, extra, extra_owner, gather):
        n = img.shape[0]
        self.first = rank() * n  # global index of this rank's first image
        self.img, self.txt = img, txt
        self.owner = owner + self.first  # global image of each local text
        self.all_img = gather(img)
        self.all_txt = gather_rows(txt, gather)
        self.all_owner = gather_rows(self.owner, gather_no_grad, -1)
        self.n_txt = self.all_owner.shape[0]
        self.extra = None
        if extra is not None:
            self.extra = gather_rows(extra, gather)
            eo = extra_owner if extra_owner is not None else torch.full((extra.shape[0],), -1, device=img.device)
            eo = torch.where(eo >= 0, eo + self.first, eo)
            self.extra_owner = gather_rows(eo.to(torch.long), gather_no_grad, -1)

    def image_logits(self, scale, bias=None):
        """[B, T_all (+ M_all)] logits of this rank's images against every text; positives; pairs left out."""
        rows = torch.arange(self.img.shape[0], device=self.img.device) + self.first
        gallery = self.all_txt if self.extra is None else torch.cat([self.all_txt, self.extra])
        logits = scale * self.img @ gallery.T + (bias if bias is not None else 0.0)
        pos = self.all_owner[None, :] == rows[:, None]
        if self.extra is None:
            return logits, pos, None
        pos = torch.cat([pos, torch.zeros(len(rows), self.extra.shape[0], dtype=torch.bool, device=pos.device)], 1)
        out = torch.zeros_like(pos)
        out[:, self.n_txt :] = self.extra_owner[None, :] == rows[:, None]
        return logits, pos, out


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch; each rank scores its own rows against all gathered features.

    With `gather_with_grad` the mean of the per-rank losses (what DDP's gradient averaging optimises)
    equals the loss on the concatenated batch, and so do its gradients.
    """

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias=None, owner=None, extra=None,
                extra_owner=None) -> torch.Tensor:  # fmt: skip
        gather = gather_with_grad if self.gather_with_grad else gather_no_grad
        if owner is None and extra is None:  # one text per image: CLIP's loss as open_clip computes it
            all_img, all_txt = gather(img), gather(txt)
            n = img.shape[0]
            labels = torch.arange(n, device=img.device) + rank() * n
            logits_per_image = scale * img @ all_txt.T
            logits_per_text = scale * txt @ all_img.T
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        if owner is None:
            owner = torch.arange(img.shape[0], device=img.device)
        s = _Step(img, txt, owner, extra, extra_owner, gather)
        logits, pos, out = s.image_logits(scale)
        if out is not None:
            logits = logits.masked_fill(out, torch.finfo(logits.dtype).min)
        logp = F.log_softmax(logits, dim=1)  # float32 under autocast
        i2t = -(logp.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)).mean()
        # each text against the batch's images; summed over this rank's texts and scaled so that the mean over
        # ranks (DDP) is the mean over all the step's texts, whatever each rank holds
        t2i = F.cross_entropy(scale * txt @ s.all_img.T, s.owner, reduction="sum") * world_size() / s.n_txt
        return (i2t + t2i) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023): every image-text pair is a binary match/no-match decision."""

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias=None, owner=None, extra=None,
                extra_owner=None) -> torch.Tensor:  # fmt: skip
        gather = gather_with_grad if self.gather_with_grad else gather_no_grad
        n = img.shape[0]
        if owner is None and extra is None:
            all_txt = gather(txt)
            logits = scale * img @ all_txt.T + (bias if bias is not None else 0.0)
            labels = -torch.ones_like(logits)
            labels[torch.arange(n), torch.arange(n) + rank() * n] = 1.0
            return -F.logsigmoid(labels * logits).sum() / n
        if owner is None:
            owner = torch.arange(n, device=img.device)
        s = _Step(img, txt, owner, extra, extra_owner, gather)
        logits, pos, out = s.image_logits(scale, bias)
        terms = F.logsigmoid(torch.where(pos, logits, -logits))
        if out is not None:
            terms = terms.masked_fill(out, 0.0)
        return -terms.sum() / n


class NestedLoss(nn.Module):
    """`loss` summed over the prefixes `dims` of the joint embedding (Matryoshka), each re-normalised. Takes
    the features before normalisation."""

    wants_raw = True

    def __init__(self, loss: nn.Module, dims: list[int]):
        super().__init__()
        self.loss, self.dims = loss, list(dims)

    def forward(self, img, txt, scale, bias=None, owner=None, extra=None, extra_owner=None) -> torch.Tensor:
        def cut(x, d):  # half precision (autocast) normalised in float32
            return None if x is None else F.normalize(x[:, :d].float() if x.dtype.itemsize < 4 else x[:, :d], dim=-1)

        return sum(self.loss(cut(img, d), cut(txt, d), scale, bias, owner, cut(extra, d), extra_owner)
                   for d in self.dims)  # fmt: skip


def nested_dims(dims: list[int], embed_dim: int) -> list[int]:
    """The dims the loss is taken at: the nested ones and the full embedding (empty when none are nested)."""
    return sorted({*dims, embed_dim}) if dims else []


def make_loss(kind: str, gather_with_grad: bool = True, dims: list[int] | None = None) -> nn.Module:
    """The loss of `kind` (clip or siglip); with `dims` (from `nested_dims`), summed over those prefixes."""
    if kind == "clip":
        loss = ClipLoss(gather_with_grad)
    elif kind == "siglip":
        loss = SigLipLoss(gather_with_grad)
    else:
        raise ValueError(f"unknown loss {kind!r} (clip or siglip)")
    return NestedLoss(loss, dims) if dims else loss
