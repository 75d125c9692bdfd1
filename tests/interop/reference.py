"""The reference side of the interop tier: runs in .venv-interop (scripts/install_interop.sh), never in .venv.

l2c's tests call it as a subprocess and compare l2c's output with what it writes:

  teacher OUT_DIR                    a tiny random Llama-3-style teacher in the released LLM2CLIP layout:
                                     config.json naming LlamaBiModel with an auto_map to the remote-code file
                                     `modeling_bidirectional_llama_encoder.py` (absent, as l2c must not need
                                     it), plain Llama weights in bf16, and a byte-level BPE tokenizer with the
                                     Llama-3 special tokens, BOS added, left padding.
  llm2vec TEACHER CAPTIONS OUT.npz   vectors of the official extraction (llm2clip/data/extract_embedding.py):
                                     llm2vec's LLM2Vec(pooling_mode="mean", max_length=512,
                                     doc_max_length=512, skip_instruction=True) after setting
                                     config._name_or_path = "meta-llama/Meta-Llama-3-8B-Instruct", in float32
                                     and bfloat16, plus llm2vec's own token ids and embed mask per caption.
  recall EMB.npz OUT.json            CLIP_benchmark's retrieval metrics (`zeroshot_retrieval.evaluate`) on
                                     precomputed image and caption embeddings.
  open_clip DIR PIXELS.npy IMAGES OUT.npz
                                     `open_clip.create_model_and_transforms('local-dir:DIR')` on an
                                     `l2c export --format open_clip`: image features of the given pixel tensors,
                                     and of the image files (a text file of paths) through open_clip's own
                                     preprocessing, both unnormalised.

Only this file imports llm2vec, clip_benchmark and open_clip: they pin other versions of transformers than l2c.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OFFICIAL_NAME = "meta-llama/Meta-Llama-3-8B-Instruct"  # what extract_embedding.py sets, so llm2vec wraps turns
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3's pre-tokenizer pattern (tiktoken cl100k style), as its tokenizer.json has it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def training_text(shared: Path, n: int = 20000) -> list[str]:
    out = []
    for name in ("flickr8k_train_captions.jsonl", "coco_val2017_captions.jsonl"):
        for line in (shared / "data" / name).read_text().splitlines():
            out += json.loads(line)["captions"]
            if len(out) >= n:
                break
    return out


def make_tokenizer(texts: list[str], vocab_size: int = 2000):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
        padding_side="left", model_max_length=131072, clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def make_teacher(out: Path, shared: Path) -> None:
    import torch
    from llm2vec.models import LlamaBiModel
    from transformers import LlamaConfig

    # Chat turns in the training text, so "\n\n" after the header becomes one token, as in Llama-3.
    turns = ["<|start_header_id|>user<|end_header_id|>\n\n" + t + "<|eot_id|>" for t in training_text(shared, 2000)]
    tokenizer = make_tokenizer(training_text(shared) + turns)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_theta=500000.0, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 256, "rope_type": "llama3"},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
                                                            tokenizer.eos_token_id],
        pad_token_id=None, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaBiModel(config).to(torch.bfloat16).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaBiModel"], cfg["architectures"]
    cfg["auto_map"] = {"AutoModel": "modeling_bidirectional_llama_encoder.LlamaBiModel"}
    cfg["_name_or_path"] = "tiny-LLM2CLIP-Llama-3-Instruct-CC-Finetuned"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def llm2vec_encode(teacher: Path, captions: Path, out: Path) -> None:
    import numpy as np
    import torch
    from llm2vec import LLM2Vec
    from llm2vec.models import LlamaBiModel
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rows = [json.loads(ln) for ln in captions.read_text().splitlines() if ln.strip()]
    texts = [r["caption"] for r in rows]
    result = {"keys": np.asarray([r["key"] for r in rows])}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        # As extract_embedding.py: the released model (here llm2vec's LlamaBiModel, which the remote-code file
        # of the released teachers is), its tokenizer as saved, the _name_or_path workaround, LLM2Vec(...).
        model = LlamaBiModel.from_pretrained(teacher, torch_dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        model.config._name_or_path = OFFICIAL_NAME
        l2v = LLM2Vec(model, tokenizer, pooling_mode="mean", max_length=512, doc_max_length=512,
                      skip_instruction=True)  # fmt: skip
        emb = l2v.encode(texts, batch_size=32, show_progress_bar=False, convert_to_tensor=True)
        result[f"emb_{name}"] = emb.float().numpy()
    # llm2vec's own token ids and pooled span, caption by caption (no padding).
    ids, n_pooled = [], []
    for t in texts:
        feat = l2v.tokenize([l2v.prepare_for_tokenization(l2v._convert_to_str("", t))])
        mask = feat["attention_mask"][0].bool()
        ids.append(feat["input_ids"][0][mask].tolist())
        n_pooled.append(int(feat["embed_mask"][0].sum()))
    result["n_pooled"] = np.asarray(n_pooled)
    result["ids_flat"] = np.asarray([i for x in ids for i in x], np.int64)
    result["ids_len"] = np.asarray([len(x) for x in ids], np.int64)
    np.savez(out, **result)


def clip_benchmark_recall(emb: Path, out: Path) -> None:
    """CLIP_benchmark's `evaluate` end to end: a dataloader of (image, [its captions]) batches; the "model"
    returns the stored embeddings (encode_image/encode_text are identities on them)."""
    import numpy as np
    import torch
    from clip_benchmark.metrics import zeroshot_retrieval

    d = np.load(emb)
    images = torch.from_numpy(d["images"])
    texts = torch.from_numpy(d["texts"])
    text_image = d["text_image"]
    per_image = [texts[text_image == i] for i in range(len(images))]
    batch = int(d["batch_size"])

    class Stored(torch.nn.Module):
        def encode_image(self, x):
            return x

        def encode_text(self, x):
            return x

    loader = [
        (images[s : s + batch], [list(per_image[i]) for i in range(s, min(s + batch, len(images)))])
        for s in range(0, len(images), batch)
    ]
    metrics = zeroshot_retrieval.evaluate(Stored(), loader, torch.stack, "cpu", amp=False,
                                          recall_k_list=[int(k) for k in d["ks"]])  # fmt: skip
    out.write_text(json.dumps(metrics, indent=2))


def import_open_clip():
    """open_clip, importable beside the CPU torch wheel. The index's torchvision wheel is linked against CUDA
    torch, so its compiled ops (nms, roi_align, ...: detection ops open_clip never calls) do not load here, and
    `import torchvision` then stops at registering fake kernels for `torchvision::nms` and `::qnms`, whose
    schemas that library would have defined. Define just those schemas (no kernels: calling them still fails)
    when the library did not load; everything open_clip runs is torch and PIL code."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    libs = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, IndexError, RuntimeError):
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import open_clip

    return open_clip


def open_clip_features(export: Path, pixels: Path, images: Path, out: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    x = torch.from_numpy(np.load(pixels))
    files = [Path(p) for p in images.read_text().splitlines() if p]
    own = torch.stack([preprocess(Image.open(f)) for f in files])
    with torch.no_grad():
        np.savez(out, given=model.encode_image(x).numpy(), own=model.encode_image(own).numpy(),
                 own_pixels=own.numpy(), version=np.asarray(open_clip.__version__))  # fmt: skip


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "teacher":
        make_teacher(Path(args[0]), Path(args[1]))
    elif cmd == "llm2vec":
        llm2vec_encode(Path(args[0]), Path(args[1]), Path(args[2]))
    elif cmd == "recall":
        clip_benchmark_recall(Path(args[0]), Path(args[1]))
    elif cmd == "open_clip":
        open_clip_features(Path(args[0]), Path(args[1]), Path(args[2]), Path(args[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")
