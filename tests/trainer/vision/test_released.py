"""Released LLM2CLIP checkpoints in and out: tiny random models in the released layout (config.json naming
LLM2CLIPModel, `vision_model.*`, `visual_projection`, `text_adapter.adaptor.*`, `logit_scale`) load as eval
models and as train-vision's start, and l2c runs export to that layout and to open_clip's, features equal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from l2c.cli import main
from l2c.eval.model import load_model
from l2c.teacher import TeacherMismatch, TeacherSpec
from l2c.trainer.job import TrainJob
from l2c.trainer.vision.config import TrainConfig
from l2c.trainer.vision.export import export_model, load_exported
from l2c.trainer.vision.loop import build_model, train
from l2c.trainer.vision.released import open_clip_state, tower_prefix
from tests.trainer.vision.train_helpers import class_cache_for, class_vectors, write_class_shards

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=24)  # fmt: skip
TEXT_DIM, EMBED_DIM, N_BLOCKS = 16, 24, 2


class ReleasedBlock(nn.Module):
    """The released adapter block: x + fn(ln(x)), fn = Linear, GELU, Dropout, Linear."""

    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.fn = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(0.0),
                                nn.Linear(expansion * dim, dim))  # fmt: skip
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.fn(self.ln(x))


class ReleasedAdapter(nn.Module):
    def __init__(self, text_dim: int, embed_dim: int, n_blocks: int):
        super().__init__()
        self.adaptor = nn.Sequential(*[ReleasedBlock(text_dim) for _ in range(n_blocks)], nn.LayerNorm(text_dim),
                                     nn.Linear(text_dim, embed_dim))  # fmt: skip

    def forward(self, x):
        return self.adaptor(x)


class ReleasedLike(nn.Module):
    """The released `LLM2CLIPModel`'s modules under its attribute names, built from transformers' CLIP vision
    transformer: what code written for the released model holds after `from_pretrained`."""

    def __init__(self, vision: CLIPVisionConfig, text_dim: int, embed_dim: int, n_blocks: int):
        super().__init__()
        tower = CLIPVisionModel(vision)  # transformers 5 flattens it; 4 wraps a CLIPVisionTransformer
        self.vision_model = getattr(tower, "vision_model", tower)
        self.visual_projection = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.text_adapter = ReleasedAdapter(text_dim, embed_dim, n_blocks)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, inputs):
        return self.text_adapter(inputs)

    @classmethod
    def from_dir(cls, path: Path) -> ReleasedLike:
        cfg = json.loads((path / "config.json").read_text())
        state = load_file(str(path / "model.safetensors"))
        n = len({k.split(".")[2] for k in state if k.startswith("text_adapter.adaptor.") and ".fn." in k})
        fc1 = state["text_adapter.adaptor.0.fn.0.weight"]
        m = cls(CLIPVisionConfig(**cfg["vision_config"]), fc1.shape[1], cfg["projection_dim"], n)
        m.load_state_dict(state, strict=True)  # every released name present, nothing else
        return m.eval()


def save_released(path: Path, seed: int = 0, text_dim: int = TEXT_DIM) -> ReleasedLike:
    """A tiny random model in the released layout: config.json (released keys, auto_map, no code files) and
    model.safetensors. Every tensor is random (LayerNorms too), so a wrong name mapping shows in the features."""
    torch.manual_seed(seed)
    m = ReleasedLike(CLIPVisionConfig(**TINY_CLIP), text_dim, EMBED_DIM, N_BLOCKS).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("position_ids")},
              str(path / "model.safetensors"))  # fmt: skip
    config = {
        "architectures": ["LLM2CLIPModel"],
        "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_clip.LLM2CLIPModel"},
        "model_type": "clip", "projection_dim": EMBED_DIM, "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0, "text_config": {"model_type": "clip_text_model"},
        "vision_config": {**TINY_CLIP, "model_type": "clip_vision_model", "dropout": 0.0},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return m


def pixels(n: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def released_features(ref: ReleasedLike, x: torch.Tensor, vec: torch.Tensor):
    """What code for the released model computes: image features, and text features of the L2-normalised
    teacher vector (what the adapter was trained on), both normalised."""
    with torch.no_grad():
        return (F.normalize(ref.get_image_features(x), dim=-1),
                F.normalize(ref.get_text_features(F.normalize(vec, dim=-1)), dim=-1))  # fmt: skip


def l2c_features(model, x, vec):
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(vec)


def max_diff(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    ref = save_released(root / "LLM2CLIP-tiny")
    return root / "LLM2CLIP-tiny", ref


def test_released_directory_is_an_eval_model(released):
    path, ref = released
    model = load_model(path)  # what eval-retrieval / eval-zeroshot --model DIR do
    meta = model.meta
    assert (meta.extra["layout"], meta.text_dim, meta.embed_dim, meta.adapter) == (
        "llm2clip-hf",
        TEXT_DIM,
        EMBED_DIM,
        {"n_blocks": N_BLOCKS, "expansion": 2},
    )
    assert meta.image_size == 32 and meta.teacher is None and meta.fingerprint == ""
    assert abs(meta.logit_scale - float(ref.logit_scale.detach().exp())) < 1e-5
    x, vec = pixels(), torch.randn(5, TEXT_DIM)
    d = max_diff(l2c_features(model, x, vec), released_features(ref, x, vec))
    assert d < 1e-6, d
    # without the adapter's normalisation the text side would differ: the check can fail
    with torch.no_grad():
        raw = F.normalize(ref.get_text_features(vec * 5), dim=-1)
        assert float((raw - model.encode_text(vec)).abs().max()) > 1e-2


def test_round_trip_load_eval_export_load(released, tmp_path):
    """released dir -> l2c eval model -> l2c export -> `l2c export --format llm2clip-hf` -> released-layout
    code loads it (strict) and l2c loads it again: the same features to 1e-6."""
    path, ref = released
    model = load_model(path)
    x, vec = pixels(), torch.randn(5, TEXT_DIM)
    want = l2c_features(model, x, vec)
    teacher = TeacherSpec(model="teacher", dim=TEXT_DIM, model_fingerprint="f00d")
    export_model(model, tmp_path / "run" / "export", None, teacher, ["txt"])
    assert (
        main(["export", str(tmp_path / "run"), "--format", "llm2clip-hf", "--out", str(tmp_path / "hf")]) == 0
    )

    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    released_cfg = json.loads((path / "config.json").read_text())
    assert set(released_cfg) <= set(cfg) and cfg["architectures"] == ["LLM2CLIPModel"]
    assert set(load_file(str(tmp_path / "hf/model.safetensors"))) == set(
        load_file(str(path / "model.safetensors"))
    )
    back = ReleasedLike.from_dir(tmp_path / "hf")
    assert max_diff(released_features(back, x, vec), want) < 1e-6
    again = load_model(tmp_path / "hf")
    assert again.image_spec == model.image_spec  # its preprocessor_config.json prepares images as before
    assert max_diff(l2c_features(again, x, vec), want) < 1e-6
    # the l2c run's teacher and fields travel in config.json["l2c"]
    assert again.meta.teacher == teacher and again.meta.fingerprint == "f00d"
    assert again.meta.text_fields == ["txt"]


def test_eval_retrieval_takes_a_released_directory(released, tmp_path):
    """`eval-retrieval --model DIR` on a released directory: recall from its own image and text features."""
    path, _ = released
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=12, n_classes=4, seed=1)
    cache = class_cache_for(tars, labels, tmp_path / "cache", class_vectors(4, TEXT_DIM))
    out = tmp_path / "eval"
    assert main(["eval-retrieval", "--model", str(path), "--images", str(tars[0]), "--text-cache", str(cache),
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    res = json.loads((out / "eval.json").read_text())
    assert res["n_images"] == 12 and 0 <= res["image_to_text"]["R@1"] <= 100


def test_eval_zeroshot_takes_a_released_directory_with_its_teacher(tmp_path):
    """`eval-zeroshot --model DIR --text-model TEACHER`: a released directory records no teacher, so it is
    named; class prompts go through the teacher and the released adapter (here a 384-d one and MiniLM)."""
    path = tmp_path / "released-384"
    save_released(path, seed=1, text_dim=384)
    tars, _ = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=12, n_classes=4, seed=1)
    (tmp_path / "classes.txt").write_text("\n".join(f"class {i}" for i in range(4)))
    out = tmp_path / "zs"
    assert main(["eval-zeroshot", "--model", str(path), "--images", str(tars[0]), "--classes",
                 str(tmp_path / "classes.txt"), "--text-model", "minilm", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    res = json.loads((out / "eval.json").read_text())
    assert res["n_images"] == 12 and 0 <= res["top1"] <= 100


def cfg_from(released_dir: Path, *more: str) -> TrainConfig:
    from l2c.config import load_config

    base = [f"model.init={released_dir}", f"model.embed_dim={EMBED_DIM}", f"model.adapter.n_blocks={N_BLOCKS}",
            "batch_size=8", "steps=3", "optim.lr=1e-3", "precision=fp32", "log_every=1", "checkpoint_every=10",
            "data.workers=0", "data.shuffle_buffer=0", "torch_threads=1"]  # fmt: skip
    return load_config(TrainConfig, None, base + list(more))


def decayed_cfg(path: Path) -> TrainConfig:
    return cfg_from(path, "optim.layer_decay=0.5")


def test_train_vision_starts_from_a_released_checkpoint(released, tmp_path):
    path, ref = released
    model, _ = build_model(cfg_from(path, "model.vision.freeze_blocks=2"), TEXT_DIM)
    model.eval()
    x, vec = pixels(), torch.randn(5, TEXT_DIM)
    assert max_diff(l2c_features(model, x, vec), released_features(ref, x, vec)) < 1e-6
    assert abs(float(model.logit_scale.detach()) - float(ref.logit_scale.detach())) < 1e-7
    frozen = {n for n, p in model.tower.named_parameters() if not p.requires_grad}
    assert any(".layers.1." in n for n in frozen) and not any(".layers.2." in n for n in frozen)
    from l2c.trainer.vision.optim import param_groups

    decayed = build_model(decayed_cfg(path), TEXT_DIM)[0]
    scales = sorted({g["lr_scale"] for g in param_groups(decayed, decayed_cfg(path).optim)})
    assert scales == [0.0625, 0.125, 0.25, 0.5, 1.0], scales  # embeddings, 3 blocks, post-LN + heads

    # a short run: frozen blocks keep the released weights, the rest trains; the export says so
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=16, n_classes=4, seed=2)
    cache = class_cache_for(tars, labels, tmp_path / "cache", class_vectors(4, TEXT_DIM))
    run = tmp_path / "run"
    summary = train(TrainJob(cfg_from(path, "model.vision.freeze_blocks=2"), [str(tars[0])], cache, run,
                             progress=False))  # fmt: skip
    assert summary["finished"]
    out = load_exported(run).state_dict()
    start = model.state_dict()
    for k in start:
        if ".layers.0." in k or ".layers.1." in k or "embeddings" in k:
            assert torch.equal(out[k], start[k]), k
    k = tower_prefix(model) + "encoder.layers.2.mlp.fc1.weight"
    assert not torch.equal(out[k], start[k])
    assert not torch.equal(out["adapter.proj.weight"], start["adapter.proj.weight"])

    # exported in the released layout, the run carries its teacher: starting from it on another teacher's cache
    # (here: the same vectors said to be cls-pooled) is refused before training, naming the key
    assert main(["export", str(run), "--format", "llm2clip-hf", "--out", str(tmp_path / "hf")]) == 0
    from l2c.cache import Manifest

    other = class_cache_for(tars, labels, tmp_path / "cls-cache", class_vectors(4, TEXT_DIM))
    m = Manifest.load(other)
    m.settings["pooling"] = "cls"
    m.save(other)
    with pytest.raises(TeacherMismatch, match="pooling: model.init=.*hf 'mean', the cache 'cls'"):
        train(TrainJob(cfg_from(tmp_path / "hf"), [str(tars[0])], other, tmp_path / "run2", progress=False))


def test_released_dims_that_do_not_fit_are_refused(released, tmp_path, refused):
    path, _ = released
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=8, n_classes=4, seed=3)
    cache = class_cache_for(tars, labels, tmp_path / "cache", class_vectors(4, TEXT_DIM + 4))
    base = ["train-vision", "--images", tars[0], "--text-cache", cache, "--out", tmp_path / "r", "--no-progress",
            f"model.init={path}", f"model.adapter.n_blocks={N_BLOCKS}"]  # fmt: skip
    refused(
        [*base, f"model.embed_dim={EMBED_DIM}"],
        r"adapter takes 16-d teacher vectors but the text cache holds 20-d",
    )
    cache16 = class_cache_for(tars, labels, tmp_path / "cache16", class_vectors(4, TEXT_DIM))
    base[4] = cache16
    refused(
        [*base, "model.embed_dim=32"],
        r"checkpoint has embed_dim=24 but model.embed_dim=32; set model.embed_dim=24",
    )
    refused([*base, f"model.embed_dim={EMBED_DIM}", f"model.vision.pretrained={tmp_path}"],
            r"model.init=.* brings its own tower")  # fmt: skip


def test_eva_checkpoint_and_other_towers_are_refused_with_one_line(released, tmp_path, refused):
    eva = tmp_path / "LLM2CLIP-EVA02-L-14-336.pt"
    torch.save({"visual.head.weight": torch.zeros(2, 2)}, eva)
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=8, n_classes=4, seed=3)
    cache = class_cache_for(tars, labels, tmp_path / "cache", class_vectors(4, TEXT_DIM))
    refused(["eval-retrieval", "--model", eva, "--images", tars[0], "--text-cache", cache, "--out", tmp_path / "e"],
            r"eva_clip checkpoint .* EVA02 tower is not a transformers model")  # fmt: skip

    # a ViT tower has no place in the released CLIP layout or in open_clip's CLIP ViT
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.model import L2CModel
    from l2c.trainer.vision.tower import build_vision_tower
    from tests.trainer.vision.train_helpers import TINY_VIT

    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_VIT)))
    export_model(L2CModel(tower, spec, text_dim=8, embed_dim=8), tmp_path / "vit" / "export", proc, None, [])
    for fmt in ("llm2clip-hf", "open_clip"):
        refused(["export", tmp_path / "vit", "--format", fmt, "--out", tmp_path / fmt],
                rf"--format {fmt}: the model's tower is 'vit'")  # fmt: skip
    refused(
        ["export", tmp_path / "vit", "--format", "onnx", "--out", tmp_path / "x"],
        r"expected llm2clip-hf or open_clip",
    )
    refused(
        ["export", tmp_path / "nothing", "--format", "open_clip", "--out", tmp_path / "x"],
        r"holds no exported",
    )


def test_open_clip_export_holds_the_tower_and_projection(released, tmp_path):
    """The open_clip checkpoint's vision half recomputes l2c's image features with open_clip's ViT arithmetic
    (x @ proj of ln_post(CLS), fused qkv); `make test-interop` loads it with open_clip itself."""
    path, _ = released
    model = load_model(path)
    export_model(model, tmp_path / "run" / "export", None, None, [])
    assert (
        main(["export", str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    )
    cfg = json.loads((tmp_path / "oc/open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"] == {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3,
                                              "head_width": 16, "mlp_ratio": 2.0}  # fmt: skip
    assert cfg["model_cfg"]["embed_dim"] == EMBED_DIM and cfg["model_cfg"]["quick_gelu"] is True
    assert cfg["preprocess_cfg"]["size"] == 32 and cfg["preprocess_cfg"]["resize_mode"] == "shortest"
    sd = load_file(str(tmp_path / "oc/open_clip_model.safetensors"))
    _, again = open_clip_state(model)
    assert set(sd) == set(again) and all(torch.equal(sd[k], again[k]) for k in sd)
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert torch.equal(sd["visual.proj"], model.visual_proj.weight.t())
    assert np.isclose(float(sd["logit_scale"]), float(model.logit_scale))
