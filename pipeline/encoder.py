"""Text encoders with transformers: BERT-like encoders as they are, decoder LLMs made bidirectional (LLM2Vec).

One code path serves the Ray actors of `embed-captions`, `eval-cra --model` and `finetune-text`:
`load_text_model` loads and switches attention, `Tokenized` prepares ids (instruction kept out of
pooling), `pool` reduces hidden states, and `TextEncoder` ties them together with token-budget batching.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from l2c.models import resolve_model
from l2c.pipeline.batching import token_budget_batches

SETTINGS_FILE = "l2c_text_encoder.json"
POOLINGS = ("mean", "cls", "last")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Decoder-only architectures used LLM2Vec-style (bidirectional attention, mean pooling).
DECODER_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "olmo", "olmo2", "starcoder2", "granite", "cohere", "stablelm",
}  # fmt: skip


def read_encoder_settings(model_dir: str | Path) -> dict:
    """Settings a fine-tuned model directory carries (pooling, bidirectional, instruction, ...), or {}."""
    p = Path(model_dir) / SETTINGS_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def save_encoder_settings(out_dir: str | Path, **settings) -> None:
    """Record how a model must be run (pooling, bidirectional, ...) so nobody has to repeat it."""
    from l2c import atomic

    atomic.write_json(Path(out_dir) / SETTINGS_FILE, settings)


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_decoder_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return config.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs)


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the causal mask: the config switch makes transformers build a bidirectional padding mask,
    and each attention module's `is_causal` flag stops SDPA/flash kernels from re-adding causality."""
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def load_text_model(
    model: str | Path,
    dtype: str = "auto",
    device: str | None = None,
    bidirectional: bool | None = None,
    lora: str | Path | None = None,
):
    """Load a text model for embedding: (model, tokenizer, info).

    Decoder LLMs are made bidirectional unless `bidirectional=False`; a LoRA adapter (a peft directory,
    given as `lora` or as the model path itself) is merged into the weights at load.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    device = device or default_device()
    path = resolve_model(model)
    saved = read_encoder_settings(path)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        lora, path = path, resolve_model(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    config = AutoConfig.from_pretrained(path)
    decoder = is_decoder_config(config)
    if bidirectional is None:
        bidirectional = saved.get("bidirectional", decoder)
    torch_dtype = resolve_dtype(dtype, device)
    net = AutoModel.from_pretrained(path, dtype=torch_dtype)
    if lora:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(lora)).merge_and_unload()
    if decoder and bidirectional:
        make_bidirectional(net)
    net.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    info = {
        "model_type": config.model_type,
        "is_decoder": decoder,
        "bidirectional": bool(bidirectional) if decoder else True,
        "pooling": saved.get("pooling", "mean"),
        "instruction": saved.get("instruction", ""),
        "path": str(path),
        "lora": str(lora) if lora else None,
        "dim": int(config.hidden_size),
        "dtype": str(torch_dtype).replace("torch.", ""),
    }
    return net, tokenizer, info


def pool(hidden: torch.Tensor, pool_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce [B, T, H] to [B, H] over the tokens where `pool_mask` is 1 (right padding assumed)."""
    mask = pool_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    idx = torch.arange(hidden.shape[1], device=hidden.device).expand_as(pool_mask)
    if pooling == "cls":
        pos = torch.where(pool_mask.bool(), idx, hidden.shape[1]).min(1).values
    elif pooling == "last":
        pos = torch.where(pool_mask.bool(), idx, -1).max(1).values
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


@dataclass
class Tokenized:
    """Token ids of many captions, ready for batching: ids[i] is a list; pool_start[i] skips the instruction."""

    ids: list[list[int]]
    pool_start: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray


class CaptionTokenizer:
    """Tokenize captions to at most `max_length` ids, with an optional instruction prefix excluded from pooling."""

    def __init__(self, tokenizer, max_length: int = 512, instruction: str = ""):
        if max_length < 4:
            raise ValueError("max_length must be at least 4")
        self.tok = tokenizer
        self.max_length = max_length
        self.instruction = instruction
        # Special tokens around a probe word: [CLS] … [SEP] for BERT, [BOS] … for Llama.
        full = tokenizer("caption", add_special_tokens=True)["input_ids"]
        bare = tokenizer("caption", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
        self.prefix, self.suffix = full[:at], full[at + len(bare) :]
        self.instr_ids = tokenizer(instruction, add_special_tokens=False)["input_ids"] if instruction else []
        self.budget = max_length - len(self.prefix) - len(self.suffix) - len(self.instr_ids)
        if self.budget < 1:
            raise ValueError(f"instruction of {len(self.instr_ids)} tokens leaves no room under max_length")

    def __call__(self, texts: list[str]) -> Tokenized:
        body = self.tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        n = len(body)
        ids, n_tokens, truncated = [], np.zeros(n, np.int32), np.zeros(n, bool)
        for i, b in enumerate(body):
            if len(b) > self.budget:
                b, truncated[i] = b[: self.budget], True
            seq = self.prefix + self.instr_ids + b + self.suffix
            ids.append(seq)
            n_tokens[i] = len(seq)
        pool_start = np.full(n, len(self.prefix) + len(self.instr_ids) if self.instr_ids else 0, np.int32)
        return Tokenized(ids, pool_start, n_tokens, truncated)


def collate(ids: list[list[int]], pool_start, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; `pool_mask` covers the real tokens after each row's instruction."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        attn[r, : len(x)] = 1
    pool_mask = attn.clone()
    for r, s in enumerate(pool_start):
        pool_mask[r, : int(s)] = 0
    return {"input_ids": input_ids.to(device), "attention_mask": attn.to(device), "pool_mask": pool_mask.to(device)}


class TextEncoder:
    """A frozen (or trainable) text encoder: captions in, one vector each out.

    >>> enc = TextEncoder.load("minilm")
    >>> enc.encode(["a dog on a beach", "two cats"]).shape
    (2, 384)
    """

    def __init__(self, model, tokenizer, info: dict, pooling: str | None = None, normalize: bool = True,
                 max_length: int = 512, instruction: str | None = None):  # fmt: skip
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.pooling = pooling or info["pooling"]
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.normalize = normalize
        self.max_length = max_length
        self.instruction = info["instruction"] if instruction is None else instruction
        self.captions = CaptionTokenizer(tokenizer, max_length, self.instruction)
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model: str | Path, pooling: str | None = None, normalize: bool = True, max_length: int = 512,
             dtype: str = "auto", instruction: str | None = None, device: str | None = None,
             bidirectional: bool | None = None, lora: str | None = None) -> TextEncoder:  # fmt: skip
        net, tok, info = load_text_model(model, dtype=dtype, device=device, bidirectional=bidirectional, lora=lora)
        return cls(net, tok, info, pooling, normalize, max_length, instruction)

    @property
    def dim(self) -> int:
        return self.info["dim"]

    def settings(self) -> dict:
        return {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "instruction": self.instruction,
            "bidirectional": self.info["bidirectional"],
            "is_decoder": self.info["is_decoder"],
            "dtype": self.info["dtype"],
            "dim": self.dim,
        }

    def forward_ids(self, ids: list[list[int]], pool_start) -> torch.Tensor:
        """Encode one batch of token ids (grad flows when the model is in train mode); not normalised."""
        batch = collate(ids, pool_start, self.tokenizer.pad_token_id, self.device)
        pool_mask = batch.pop("pool_mask")
        hidden = self.model(**batch).last_hidden_state
        return pool(hidden, pool_mask, self.pooling)

    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """Tokenize and encode a list of texts as one batch (for training); not normalised."""
        tok = self.captions(texts)
        return self.forward_ids(tok.ids, tok.pool_start)

    @torch.inference_mode()
    def encode_tokenized(self, tok: Tokenized, batch_tokens: int = 16384, max_batch_size: int = 512,
                         stats: dict | None = None) -> np.ndarray:  # fmt: skip
        """Encode pre-tokenized captions with length-sorted token-budget batches; rows keep input order."""
        n = len(tok.ids)
        out = np.zeros((n, self.dim), np.float32)
        lengths = np.asarray([len(x) for x in tok.ids], np.int64)
        for idx in token_budget_batches(lengths, batch_tokens, max_batch_size):
            vec = self.forward_ids([tok.ids[i] for i in idx], tok.pool_start[idx]).float()
            if self.normalize:
                vec = F.normalize(vec, dim=-1)
            out[idx] = vec.cpu().numpy()
            if stats is not None:
                stats["real_tokens"] = stats.get("real_tokens", 0) + int(lengths[idx].sum())
                stats["padded_tokens"] = stats.get("padded_tokens", 0) + int(lengths[idx].max()) * len(idx)
                stats["batches"] = stats.get("batches", 0) + 1
        return out

    def encode(self, texts: list[str], batch_tokens: int = 16384, max_batch_size: int = 512) -> np.ndarray:
        """Captions → float32 [n, dim] (L2-normalised unless normalize=False)."""
        return self.encode_tokenized(self.captions(texts), batch_tokens, max_batch_size)
