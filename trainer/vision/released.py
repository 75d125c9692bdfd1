"""The released LLM2CLIP vision models in and out of l2c (docs/released_models.md has the name mapping).

A released OpenAI-variant model directory (`LLM2CLIP-Openai-L-14-336`, `-L-14-224`, `-B-16`) holds a
`config.json` naming `LLM2CLIPModel` (model_type `clip`, `vision_config`, `projection_dim`) and one weights file
whose tensors are a CLIP vision transformer (`vision_model.*`), a bias-free `visual_projection`, the text
adapter `text_adapter.adaptor.*` (N pre-LN residual MLP blocks, a LayerNorm, a Linear) and `logit_scale`. That
is exactly l2c's model (tower + `visual_proj` + `TextAdapter` + `logit_scale`) under other names, so:

- `load_released(DIR)`: such a directory as an eval model (what `eval-retrieval`/`eval-zeroshot --model` get);
- `init_from_released(model, DIR)`: `train-vision model.init=DIR` starts from its weights;
- `export_llm2clip_hf(RUN, OUT)`: an l2c run in that layout (code written for the released model loads it);
- `export_open_clip(RUN, OUT)`: the tower and projection as an open_clip checkpoint (`local-dir:OUT`).

The remote-code files the released directories carry are neither needed nor run: the tower is transformers'
own `CLIPVisionModel`, the rest are plain tensors.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from l2c import atomic, outputs
from l2c.errors import L2CError
from l2c.meta import ModelMeta

log = logging.getLogger(__name__)

ARCH = "LLM2CLIPModel"
FORMAT = "llm2clip-hf"
L2C_KEY = "l2c"  # config.json key of an l2c export in this layout: the l2c meta (teacher, fields, image spec)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# A CLIPModel checkpoint's text tower: not part of LLM2CLIPModel, skipped when present.
_IGNORED = ("text_model.", "text_projection.")
_BLOCK = re.compile(r"text_adapter\.adaptor\.(\d+)\.(ln|fn\.0|fn\.3)\.(weight|bias)$")
_TAIL = re.compile(r"text_adapter\.adaptor\.(\d+)\.(weight|bias)$")
_BLOCK_L2C = {"ln": "norm", "fn.0": "fc1", "fn.3": "fc2"}
_BLOCK_REL = {v: k for k, v in _BLOCK_L2C.items()}


class ReleasedModelError(L2CError):
    """A released-layout checkpoint l2c cannot read or write."""


# --- reading the released layout -------------------------------------------------------------------


def is_released_dir(path: str | Path) -> bool:
    """A directory whose config.json names `LLM2CLIPModel` (released, or written by `export --format llm2clip-hf`)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return ARCH in (cfg.get("architectures") or [])


def _check_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".pt", ".pth"):
        raise ReleasedModelError(
            f"{p}: an eva_clip checkpoint (.pt: `visual.*` EVA02 tower, `text.text_adaptor.*`); its EVA02 tower is "
            "not a transformers model, so l2c reads only the released OpenAI-variant directories (config.json "
            f"naming {ARCH}); see docs/released_models.md"
        )
    if not is_released_dir(p):
        raise ReleasedModelError(f"{p}: not a released LLM2CLIP model directory (config.json naming {ARCH})")
    return p


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released directory (model.safetensors, else pytorch_model.bin), as float32."""
    p = Path(path)
    for name in WEIGHTS:
        f = p / name
        if f.is_file():
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(f))
            else:
                state = torch.load(f, map_location="cpu", weights_only=True)
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    raise ReleasedModelError(f"{p}: no weights file ({' or '.join(WEIGHTS)})")


def adapter_shape(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """text_dim, embed_dim, n_blocks, expansion of the released adapter in `state`."""
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))) or f"text_adapter.adaptor.{len(blocks) + 1}.weight" not in state:
        raise ReleasedModelError(
            "the checkpoint's text adapter is not the released layout (text_adapter.adaptor.{i}.ln/fn.0/fn.3 "
            "blocks, then a LayerNorm and a Linear)"
        )
    n = len(blocks)
    proj = state[f"text_adapter.adaptor.{n + 1}.weight"]
    if n:
        fc1 = state["text_adapter.adaptor.0.fn.0.weight"]
        text_dim, expansion = int(fc1.shape[1]), int(fc1.shape[0]) // int(fc1.shape[1])
    else:
        text_dim, expansion = int(proj.shape[1]), 2
    return {"text_dim": text_dim, "embed_dim": int(proj.shape[0]), "n_blocks": n, "expansion": expansion}


def tower_prefix(model) -> str:
    """Where the CLIP vision transformer's tensors sit in an L2CModel's state: `tower.vision_model.` (transformers
    4: CLIPVisionModel wraps a CLIPVisionTransformer) or `tower.` (transformers 5: flattened)."""
    return "tower.vision_model." if hasattr(model.tower, "vision_model") else "tower."


def to_l2c_names(state: dict[str, torch.Tensor], prefix: str = "tower.") -> dict[str, torch.Tensor]:
    """Released names -> L2CModel names (`prefix`: see `tower_prefix`). Unknown tensors are refused."""
    n = adapter_shape(state)["n_blocks"]
    out, unknown = {}, []
    for k, v in state.items():
        if k.startswith("vision_model."):
            if not k.endswith(".position_ids"):  # a buffer older transformers saved; rebuilt at init
                out[prefix + k[len("vision_model.") :]] = v
        elif k == "visual_projection.weight":
            out["visual_proj.weight"] = v
        elif k == "logit_scale":
            out["logit_scale"] = v.reshape(())
        elif m := _BLOCK.match(k):
            out[f"adapter.blocks.{m.group(1)}.{_BLOCK_L2C[m.group(2)]}.{m.group(3)}"] = v
        elif (m := _TAIL.match(k)) and int(m.group(1)) in (n, n + 1):
            out[f"adapter.{'norm' if int(m.group(1)) == n else 'proj'}.{m.group(2)}"] = v
        elif not k.startswith(_IGNORED):
            unknown.append(k)
    if unknown:
        raise ReleasedModelError(
            f"the checkpoint holds tensors the released LLM2CLIPModel does not: {unknown[:5]}"
            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    return out


def from_l2c_names(
    state: dict[str, torch.Tensor], n_blocks: int, prefix: str = "tower."
) -> dict[str, torch.Tensor]:
    """L2CModel state (tower, visual_proj, adapter, logit_scale) -> released names."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            if not k.endswith("position_ids"):
                out["vision_model." + k[len(prefix) :]] = v
        elif k == "visual_proj.weight":
            out["visual_projection.weight"] = v
        elif k == "logit_scale":
            out["logit_scale"] = v.reshape(())
        elif m := re.match(r"adapter\.blocks\.(\d+)\.(norm|fc1|fc2)\.(weight|bias)$", k):
            out[f"text_adapter.adaptor.{m.group(1)}.{_BLOCK_REL[m.group(2)]}.{m.group(3)}"] = v
        elif m := re.match(r"adapter\.(norm|proj)\.(weight|bias)$", k):
            i = n_blocks if m.group(1) == "norm" else n_blocks + 1
            out[f"text_adapter.adaptor.{i}.{m.group(2)}"] = v
        else:
            raise ReleasedModelError(f"{k}: no place for it in the released layout")
    return out


def _image_spec(path: Path, vision_config):
    """The directory's image processor if it has one, else OpenAI CLIP's (what the released model card uses)."""
    from l2c.trainer.vision.tower import ImageSpec, image_spec_from_processor

    if (path / "preprocessor_config.json").is_file():
        from transformers import CLIPImageProcessor

        return image_spec_from_processor(CLIPImageProcessor.from_pretrained(path))
    from l2c.trainer.vision.config import VisionConfig

    size, d = int(vision_config.image_size), VisionConfig()
    return ImageSpec(size, [size, size], list(d.image_mean), list(d.image_std))


def _tower(path: Path):
    from transformers import CLIPConfig, CLIPVisionModel

    config = CLIPConfig.from_pretrained(path)
    return CLIPVisionModel(config.vision_config), config


def load_released(path: str | Path, device: str | torch.device = "cpu"):
    """A released-layout directory as an eval-mode `ExportedModel` with `.meta` (the l2c export's keys)."""
    from l2c.trainer.vision.export import ExportedModel

    p = _check_dir(path)
    state = read_state(p)
    shape = adapter_shape(state)
    tower, config = _tower(p)
    spec = _image_spec(p, config.vision_config)
    model = ExportedModel(tower, spec, text_dim=shape["text_dim"], embed_dim=shape["embed_dim"],
                          n_blocks=shape["n_blocks"], expansion=shape["expansion"])  # fmt: skip
    _load_into(model, state, p)
    rec = recorded_meta(p)
    kept = {k: rec.extra[k] for k in ("train_steps", "samples_seen", "loss") if rec and k in rec.extra}
    meta = ModelMeta.of(model, rec.teacher if rec else None, rec.text_fields if rec else [],
                        {"source": str(p), "layout": FORMAT, **kept})  # fmt: skip
    model.meta = meta
    return model.to(device).eval()


def recorded_meta(path: str | Path) -> ModelMeta | None:
    """The l2c metadata (teacher, caption fields, training record) a released-layout directory carries when an
    l2c run was exported to it (`config.json["l2c"]`), else None."""
    p = Path(path)
    recorded = json.loads((p / "config.json").read_text()).get(L2C_KEY)
    return ModelMeta.from_dict(recorded, f"{p / 'config.json'} [{L2C_KEY}]") if recorded else None


def _load_into(model, state: dict[str, torch.Tensor], where: Path, tower: bool = True) -> None:
    """Released tensors into an L2CModel; every parameter must be covered and every shape must fit."""
    mine = model.state_dict()
    theirs = to_l2c_names(state, tower_prefix(model))
    if not tower:
        theirs = {k: v for k, v in theirs.items() if not k.startswith("tower.")}
    want = [k for k in mine if k != "logit_bias" and not k.endswith("position_ids")
            and (tower or not k.startswith("tower."))]  # fmt: skip
    missing = [k for k in want if k not in theirs]
    bad = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in theirs.items()
           if k in mine and tuple(v.shape) != tuple(mine[k].shape)]  # fmt: skip
    if missing or bad:
        raise ReleasedModelError(
            f"{where}: the checkpoint does not fit the model: "
            + "; ".join(
                filter(None, [f"missing {missing[:4]}" if missing else "", f"shape {bad[:3]}" if bad else ""])
            )  # fmt: skip
        )
    with torch.no_grad():
        for k, v in theirs.items():
            mine[k].copy_(v.to(mine[k].dtype))


# --- train-vision model.init=DIR ---------------------------------------------------------------------


def init_from_released(model, path: str | Path, text_dim: int) -> dict:
    """Load a released checkpoint's tower, projection, adapter and logit scale into a freshly built model.

    Its dims must be the model's (the config's `embed_dim`, `adapter.*`, the cache's text dim): a mismatch is
    one line naming both numbers. Returns the checkpoint's shape."""
    p = _check_dir(path)
    state = read_state(p)
    shape = adapter_shape(state)
    where = f"model.init={path}"
    if shape["text_dim"] != text_dim:
        raise ReleasedModelError(
            f"{where}: its adapter takes {shape['text_dim']}-d teacher vectors but the text cache holds "
            f"{text_dim}-d vectors; embed the captions with the teacher the checkpoint was trained on"
        )
    for key, mine in (("embed_dim", model.embed_dim), ("n_blocks", model.adapter_shape["n_blocks"]),
                      ("expansion", model.adapter_shape["expansion"])):  # fmt: skip
        if shape[key] != mine:
            name = "model.embed_dim" if key == "embed_dim" else f"model.adapter.{key}"
            raise ReleasedModelError(
                f"{where}: the checkpoint has {key}={shape[key]} but {name}={mine}; set {name}={shape[key]}"
            )
    if (
        getattr(model, "image_head_shape", {"feature": "pooled", "layers": 1}).get("layers", 1) != 1
        or getattr(model, "feature", "pooled") != "pooled"
    ):
        raise ReleasedModelError(f"{where}: the released image head is a linear projection of the pooled "
                                 "feature; leave model.vision.feature and head_layers at their defaults")  # fmt: skip
    if type(model.tower).__name__ != "CLIPVisionModel":
        raise ReleasedModelError(f"{where}: the tower must come from the checkpoint (leave model.vision.pretrained "
                                 f"empty or set it to the same directory), not a {type(model.tower).__name__}")  # fmt: skip
    _load_into(model, state, p)
    log.info("model.init: tower, projection, %d-block adapter and logit scale %.4g loaded from %s",
             shape["n_blocks"], float(model.scale().detach()), p)  # fmt: skip
    return shape


# --- l2c export --format llm2clip-hf | open_clip --------------------------------------------------


def _linear_clip(model, fmt: str) -> None:
    head = getattr(model, "image_head_shape", {"feature": "pooled", "layers": 1})
    if head.get("feature", "pooled") != "pooled" or int(head.get("layers", 1)) != 1:
        raise ReleasedModelError(
            f"--format {fmt}: the model's image head is {head}; the released layout holds a linear projection "
            "of the pooled feature"
        )
    if model.tower.config.model_type != "clip_vision_model":
        raise ReleasedModelError(
            f"--format {fmt}: the model's tower is {model.tower.config.model_type!r}; this format holds a CLIP ViT "
            "tower (clip_vision_model) only"
        )


def _processor(spec) -> dict:
    from transformers import CLIPImageProcessor

    resize = spec.resize if isinstance(spec.resize, int) else None
    if resize is None:
        raise ReleasedModelError(
            f"image resize {spec.resize} is not a shortest-edge resize CLIP's processor does"
        )
    crop = spec.crop or [resize, resize]
    proc = CLIPImageProcessor(size={"shortest_edge": resize}, crop_size={"height": crop[0], "width": crop[1]},
                              image_mean=list(spec.image_mean), image_std=list(spec.image_std))  # fmt: skip
    return proc


def export_llm2clip_hf(run: str | Path, out: str | Path, code_from: str | Path | None = None) -> Path:
    """An l2c run (RUN_DIR or its export) as a released-layout directory: config.json with the released keys,
    model.safetensors with the released names, the image processor; `code_from` copies the released
    directory's remote-code files (configuration_clip.py, modeling_clip.py) beside them."""
    from safetensors.torch import save_file

    from l2c.trainer.vision.export import load_exported

    out = outputs.check(out, "export")  # before any work: never a file, a run, a cache or a foreign folder
    code = [Path(code_from) / name for name in ("configuration_clip.py", "modeling_clip.py")] if code_from else []
    for f in code:
        if not f.is_file():
            raise ReleasedModelError(f"--code-from {code_from}: no {f.name} there (a released model directory has it)")
    model = load_exported(run)
    _linear_clip(model, FORMAT)
    n = model.adapter_shape["n_blocks"]
    state = {
        k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if k != "logit_bias"
    }
    tensors = from_l2c_names(state, n, tower_prefix(model))
    vision = model.tower.config.to_dict()
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        vision.pop(k, None)
    vision["projection_dim"] = model.embed_dim
    config = {
        "architectures": [ARCH],
        "auto_map": {
            "AutoConfig": "configuration_clip.CLIPConfig",
            "AutoModel": "modeling_clip.LLM2CLIPModel",
        },
        "model_type": "clip",
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": round(math.log(1 / 0.07), 4),
        "initializer_factor": 1.0,
        "text_config": {"model_type": "clip_text_model"},
        "vision_config": vision,
        "torch_dtype": "float32",
        L2C_KEY: model.meta.to_dict(),
    }
    with atomic.atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic.write_json(tmp / "config.json", config)
        _processor(model.image_spec).save_pretrained(tmp)
        for f in code:
            atomic.write_bytes(tmp / f.name, f.read_bytes())
        outputs.mark(tmp, "export", FORMAT)
    return out


def open_clip_state(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(open_clip model_cfg, state dict) for the CLIP vision tower + projection; the text tower a zero stub."""
    _linear_clip(model, "open_clip")
    c = model.tower.config
    if c.hidden_act not in ("quick_gelu", "gelu"):
        raise ReleasedModelError(
            f"--format open_clip: tower activation {c.hidden_act!r}; open_clip's ViT has quick_gelu or gelu"
        )
    pre = tower_prefix(model)
    src = {k[len(pre) :]: v.detach().float().cpu() for k, v in model.state_dict().items()
           if k.startswith(pre) and not k.endswith("position_ids")}  # fmt: skip
    sd = {
        "visual.class_embedding": src["embeddings.class_embedding"],
        "visual.conv1.weight": src["embeddings.patch_embedding.weight"],
        "visual.positional_embedding": src["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": src["pre_layrnorm.weight"],
        "visual.ln_pre.bias": src["pre_layrnorm.bias"],
        "visual.ln_post.weight": src["post_layernorm.weight"],
        "visual.ln_post.bias": src["post_layernorm.bias"],
        "visual.proj": model.visual_proj.weight.detach().float().cpu().t(),
    }
    for i in range(c.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for x in ("weight", "bias"):
            sd[b + "ln_1." + x] = src[a + "layer_norm1." + x]
            sd[b + "ln_2." + x] = src[a + "layer_norm2." + x]
            sd[b + "attn.in_proj_" + x] = torch.cat([src[a + f"self_attn.{q}_proj.{x}"] for q in "qkv"])
            sd[b + "attn.out_proj." + x] = src[a + "self_attn.out_proj." + x]
            sd[b + "mlp.c_fc." + x] = src[a + "mlp.fc1." + x]
            sd[b + "mlp.c_proj." + x] = src[a + "mlp.fc2." + x]
    # open_clip's CLIP always has a text tower; l2c's text side is the LLM teacher + adapter (llm2clip-hf), so
    # the smallest transformer open_clip builds stands in, all zeros.
    text = {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}
    w, e = text["width"], model.embed_dim
    t = "transformer.resblocks.0."
    for name, shape in (("ln_1.weight", [w]), ("ln_1.bias", [w]), ("attn.in_proj_weight", [3 * w, w]),
                        ("attn.in_proj_bias", [3 * w]), ("attn.out_proj.weight", [w, w]), ("attn.out_proj.bias", [w]),
                        ("ln_2.weight", [w]), ("ln_2.bias", [w]), ("mlp.c_fc.weight", [4 * w, w]),
                        ("mlp.c_fc.bias", [4 * w]), ("mlp.c_proj.weight", [w, 4 * w]), ("mlp.c_proj.bias", [w])):  # fmt: skip
        sd[t + name] = torch.zeros(shape)
    sd.update({
        "token_embedding.weight": torch.zeros(text["vocab_size"], w),
        "positional_embedding": torch.zeros(text["context_length"], w),
        "ln_final.weight": torch.zeros(w),
        "ln_final.bias": torch.zeros(w),
        "text_projection": torch.zeros(w, e),
        "logit_scale": model.logit_scale.detach().float().cpu().reshape(()),
    })  # fmt: skip
    vision = {
        "image_size": model.image_spec.image_size,
        "patch_size": int(c.patch_size),
        "width": int(c.hidden_size),
        "layers": int(c.num_hidden_layers),
        "head_width": int(c.hidden_size) // int(c.num_attention_heads),
        "mlp_ratio": int(c.intermediate_size) / int(c.hidden_size),
    }
    if float(c.layer_norm_eps) != 1e-5:
        vision["norm_kwargs"] = {"eps": float(c.layer_norm_eps)}
    cfg = {"embed_dim": e, "quick_gelu": c.hidden_act == "quick_gelu", "vision_cfg": vision, "text_cfg": text}
    return cfg, {k: v.contiguous() for k, v in sd.items()}


def export_open_clip(run: str | Path, out: str | Path) -> Path:
    """An l2c run's CLIP vision tower + projection as `OUT/open_clip_config.json` + `open_clip_model.safetensors`:
    `open_clip.create_model_and_transforms('local-dir:OUT')` loads it."""
    from safetensors.torch import save_file

    from l2c.trainer.vision.export import load_exported

    out = outputs.check(out, "export")  # before any work: never a file, a run, a cache or a foreign folder
    model = load_exported(run) if not hasattr(run, "state_dict") else run
    cfg, sd = open_clip_state(model)
    spec = model.image_spec
    if not isinstance(spec.resize, int):
        raise ReleasedModelError(
            f"--format open_clip: image resize {spec.resize} is not a shortest-edge resize"
        )
    preprocess = {"size": spec.image_size, "mean": list(spec.image_mean), "std": list(spec.image_std),
                  "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip
    with atomic.atomic_dir(out) as tmp:
        save_file(sd, str(tmp / "open_clip_model.safetensors"))
        atomic.write_json(tmp / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": preprocess,
                                                          L2C_KEY: model.meta.to_dict() if hasattr(model, "meta") else {}})  # fmt: skip
        outputs.mark(tmp, "export", "open_clip")
    return out


# --- the command ------------------------------------------------------------------------------------


def register(app) -> None:
    import typer

    @app.command("export")
    def export_cmd(
        run: str = typer.Argument(..., help="A train-vision run directory (or its export/)."),
        fmt: str = typer.Option(
            ..., "--format", help="llm2clip-hf (the released LLM2CLIPModel layout) or open_clip."
        ),
        out: str = typer.Option(
            ..., "--out", help="A new or empty folder, or an earlier export (replaced only once complete); "
            "never a file, a run directory or a folder of other files."
        ),
        code_from: str = typer.Option(
            None,
            "--code-from",
            help="llm2clip-hf: a released model directory whose configuration_clip.py and "
            "modeling_clip.py are copied beside the weights (for AutoModel with trust_remote_code).",
        ),
    ) -> None:
        """Write a trained model in another project's layout: the released LLM2CLIP one, or open_clip's."""
        from l2c.trainer.vision.export import find_export

        try:
            find_export(run)
        except FileNotFoundError as e:
            raise ReleasedModelError(str(e)) from None
        if fmt == FORMAT:
            path = export_llm2clip_hf(run, out, code_from)
            how = "AutoModel.from_pretrained(..., trust_remote_code=True) with the released modeling_clip.py"
        elif fmt == "open_clip":
            if code_from:
                raise ReleasedModelError("--code-from goes with --format llm2clip-hf")
            path = export_open_clip(run, out)
            how = f"open_clip.create_model_and_transforms('local-dir:{path}')"
        else:
            raise ReleasedModelError(f"--format {fmt!r}: expected llm2clip-hf or open_clip")
        typer.echo(f"exported {run} as {fmt} to {path}; load with {how}")
