"""Text encoders with transformers: BERT-like encoders as they are, decoder LLMs made bidirectional (LLM2Vec).

One code path serves the Ray actors of `embed-captions`, `eval-cra --model` and `finetune-text`:
`load_text_model` loads and switches attention (released llm2vec-style `LlamaBiModel` directories
included), `CaptionTokenizer` prepares ids (instruction kept out of pooling; `--prompt-format` wraps each
caption as llm2vec does, see `prompt_formats`), `pool` reduces hidden states, and `TextEncoder` ties them
together with token-budget batching.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from l2c.errors import L2CError
from l2c.models import resolve_model
from l2c.pipeline.batching import token_budget_batches
from l2c.pipeline.prompt_formats import check_tokenizer, get_format, wrap

SETTINGS_FILE = "l2c_text_encoder.json"
POOLINGS = ("mean", "cls", "last")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Decoder-only architectures used LLM2Vec-style (bidirectional attention, mean pooling).
DECODER_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "olmo", "olmo2", "starcoder2", "granite", "cohere", "stablelm",
}  # fmt: skip


# Decoder model types whose attention l2c makes bidirectional (`make_bidirectional`), each checked with a tiny
# random model in tests/pipeline/test_prompt_format.py: changing the last token changes the first token's state.
BIDIRECTIONAL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                       "olmo", "olmo2", "granite", "cohere", "starcoder2", "stablelm", "phi", "mixtral",
                       "qwen2_moe", "qwen3_moe")  # fmt: skip


def released_class(config) -> str | None:
    """The llm2vec-style bidirectional class a released teacher's config.json names (architectures, or the
    auto_map of AutoModel to a remote-code file, e.g. `modeling_bidirectional_llama_encoder.LlamaBiModel`).

    Such a directory holds plain weights of the base architecture; l2c loads them with transformers' own class
    and makes it bidirectional itself, so the remote-code file is neither needed nor run.
    """
    names = list(getattr(config, "architectures", None) or [])
    auto = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if auto:
        names.append(str(auto).rsplit(".", 1)[-1])
    for n in names:
        if n.endswith("BiModel") or (n.endswith("EncoderModel") and config.model_type in DECODER_TYPES):
            return n
    return None


def check_bidirectional_supported(config, path: str | Path = "") -> None:
    """Refuse a decoder that l2c cannot make bidirectional, naming the architectures it can."""
    if config.model_type not in BIDIRECTIONAL_TYPES:
        released = released_class(config)
        what = f"{released} (model_type {config.model_type!r})" if released else f"model_type {config.model_type!r}"
        raise L2CError(
            f"{path or 'this model'} is a decoder of {what}, which l2c cannot make bidirectional. "
            f"Supported model types: {', '.join(sorted(BIDIRECTIONAL_TYPES))}."
            + ("" if released else " Pass --causal to run it with causal attention.")
        )


def default_prompt_format(path: str | Path, config=None, saved: dict | None = None) -> tuple[str, str]:
    """(prompt format, where it comes from) for a model directory when no --prompt-format is given.

    A model directory written by l2c carries its format (`l2c_text_encoder.json`); a released LLM2CLIP teacher
    (a `LlamaBiModel` layout whose tokenizer has Llama-3's chat tokens) gets `llm2vec-llama3`, as the official
    extraction runs it; anything else `none`.
    """
    from transformers import AutoConfig

    saved = read_encoder_settings(path) if saved is None else saved
    if saved.get("prompt_format"):
        return str(saved["prompt_format"]), f"model directory ({SETTINGS_FILE})"
    config = config if config is not None else AutoConfig.from_pretrained(path)
    released = released_class(config)
    if released and config.model_type == "llama":
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
        if all(t in vocab for t in get_format("llm2vec-llama3").tokens):
            return "llm2vec-llama3", f"released LLM2CLIP teacher ({released}, Llama-3 chat tokens)"
    return "none", "default"


def read_encoder_settings(model_dir: str | Path) -> dict:
    """Settings a fine-tuned model directory carries (pooling, bidirectional, instruction, ...), or {}."""
    p = Path(model_dir) / SETTINGS_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def save_encoder_settings(out_dir: str | Path, **settings) -> None:
    """Record how a model must be run (pooling, bidirectional, prompt format, ...) so nobody has to repeat it.

    Without a `prompt_format` the one of `base_model` (a model directory: its recorded format, or the
    released-teacher default) is recorded, so a teacher fine-tuned from a released one embeds the way it was
    trained; with neither, `none`.
    """
    from l2c import atomic

    if not settings.get("prompt_format"):
        fmt = "none"
        if settings.get("base_model"):
            try:
                fmt = default_prompt_format(resolve_model(settings["base_model"]))[0]
            except (OSError, ValueError):  # the base model has moved: nothing to inherit
                fmt = "none"
        settings["prompt_format"] = fmt
    get_format(settings["prompt_format"])  # a known name
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
    return (config.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs)
            or released_class(config) is not None)  # fmt: skip


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
    prompt_format: str | None = None,
):
    """Load a text model for embedding: (model, tokenizer, info).

    Decoder LLMs are made bidirectional unless `bidirectional=False`; a LoRA adapter (a peft directory,
    given as `lora` or as the model path itself) is merged into the weights at load. A released llm2vec-style
    directory (config naming `LlamaBiModel`, auto_map to a remote-code file) loads with transformers' own
    class for its model_type, without the remote code. `prompt_format` (default: the directory's, see
    `default_prompt_format`) is checked against the tokenizer and recorded in `info`.
    """
    from transformers import MODEL_MAPPING, AutoConfig, AutoModel, AutoTokenizer

    device = device or default_device()
    path = resolve_model(model)
    saved = read_encoder_settings(path)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        lora, path = path, resolve_model(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
        saved = {**read_encoder_settings(path), **saved}
    config = AutoConfig.from_pretrained(path)
    decoder = is_decoder_config(config)
    released = released_class(config)
    if bidirectional is None:
        bidirectional = saved.get("bidirectional", decoder)
    if released or (decoder and bidirectional):
        check_bidirectional_supported(config, path)
    if prompt_format is None:
        prompt_format, format_source = default_prompt_format(path, config, saved)
    else:
        format_source = "--prompt-format"
    fmt = get_format(prompt_format)
    torch_dtype = resolve_dtype(dtype, device)
    if released:  # plain weights of the base class; never the remote-code file the config points at
        net = MODEL_MAPPING[type(config)].from_pretrained(path, config=config, dtype=torch_dtype)
    else:
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
    check_tokenizer(fmt, tokenizer, str(path))
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
        "prompt_format": prompt_format,
        "prompt_format_source": format_source,
        "released_class": released,
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
    """Token ids of many captions, ready for batching: ids[i] is a list (or 1-D int array); pool_start[i] skips
    the instruction."""

    ids: list[list[int]]
    pool_start: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray


class CaptionTokenizer:
    """Tokenize captions to at most `max_length` ids, with an optional instruction prefix excluded from pooling.

    With an `llm2vec-*` prompt format every caption is wrapped in the model's user turn and the pooled span
    is what llm2vec pools (see `l2c.pipeline.prompt_formats`): `pool_start` then differs row by row.
    """

    def __init__(self, tokenizer, max_length: int = 512, instruction: str = "", prompt_format: str | None = "none"):
        if max_length < 4:
            raise ValueError("max_length must be at least 4")
        self.tok = tokenizer
        self.max_length = max_length
        self.instruction = instruction or ""
        self.prompt_format = prompt_format or "none"
        self.fmt = get_format(self.prompt_format)
        check_tokenizer(self.fmt, tokenizer)
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
        if self.fmt is not None:
            return self._wrapped(list(texts))
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

    def _wrapped(self, texts: list[str]) -> Tokenized:
        """llm2vec's `tokenize`: the wrapped string with special tokens, cut at max_length by the tokenizer;
        the last n tokens pooled, n = tokens of caption + closing marker alone (also capped at max_length);
        n = 0 (a caption starting with llm2vec's separator) pools every token, as llm2vec's `[-0:]` does."""
        n = len(texts)
        if not n:
            return Tokenized([], np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool))
        pairs = [wrap(self.fmt, t, self.instruction) for t in texts]
        ids = self.tok([p[0] for p in pairs], add_special_tokens=True)["input_ids"]
        tails = self.tok([p[1] for p in pairs], add_special_tokens=False)["input_ids"]
        truncated = np.asarray([len(x) > self.max_length for x in ids], bool)
        long = np.flatnonzero(truncated)
        if len(long):
            cut = self.tok([pairs[i][0] for i in long], add_special_tokens=True, truncation=True,
                           max_length=self.max_length)["input_ids"]  # fmt: skip
            for i, x in zip(long, cut, strict=True):
                ids[i] = x
        ids = [list(x) for x in ids]
        n_tokens = np.asarray([len(x) for x in ids], np.int32)
        pooled = np.minimum([min(len(t), self.max_length) for t in tails], n_tokens)
        pooled[pooled == 0] = n_tokens[pooled == 0]
        return Tokenized(ids, (n_tokens - pooled).astype(np.int32), n_tokens, truncated)


def collate(ids: list[list[int]], pool_start, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a batch; `pool_mask` covers the real tokens after each row's instruction."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    cols = np.arange(int(lengths.max()))
    attn = cols < lengths[:, None]
    input_ids = np.full(attn.shape, pad_id, np.int64)
    input_ids[attn] = np.concatenate(ids)  # row-major order of the mask is the order of the ids
    pool_mask = attn & (cols >= np.asarray(pool_start, np.int64)[:, None])
    return {"input_ids": torch.from_numpy(input_ids).to(device), "attention_mask": torch.from_numpy(attn).long().to(device),
            "pool_mask": torch.from_numpy(pool_mask).long().to(device)}  # fmt: skip


class TextEncoder:
    """A frozen (or trainable) text encoder: captions in, one vector each out.

    >>> enc = TextEncoder.load("minilm")
    >>> enc.encode(["a dog on a beach", "two cats"]).shape
    (2, 384)
    """

    def __init__(self, model, tokenizer, info: dict, pooling: str | None = None, normalize: bool = True,
                 max_length: int = 512, instruction: str | None = None,
                 prompt_format: str | None = None):  # fmt: skip
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.pooling = pooling or info["pooling"]
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.normalize = normalize
        self.max_length = max_length
        self.instruction = info["instruction"] if instruction is None else instruction
        self.prompt_format = prompt_format or info.get("prompt_format") or "none"
        self.captions = CaptionTokenizer(tokenizer, max_length, self.instruction, self.prompt_format)
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model: str | Path, pooling: str | None = None, normalize: bool = True, max_length: int = 512,
             dtype: str = "auto", instruction: str | None = None, device: str | None = None,
             bidirectional: bool | None = None, lora: str | None = None,
             prompt_format: str | None = None) -> TextEncoder:  # fmt: skip
        """`prompt_format=None` takes the model directory's (see `default_prompt_format`)."""
        net, tok, info = load_text_model(model, dtype=dtype, device=device, bidirectional=bidirectional, lora=lora,
                                         prompt_format=prompt_format)  # fmt: skip
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
            "prompt_format": self.prompt_format,
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

    def encode_tokenized(self, tok: Tokenized, batch_tokens: int = 16384, max_batch_size: int = 512,
                         stats: dict | None = None, streams: int = 1) -> np.ndarray:  # fmt: skip
        """Encode pre-tokenized captions with length-sorted token-budget batches; rows keep input order.

        `streams` > 1 runs that many batches at once on threads (torch releases the GIL inside its kernels): on
        a CPU with one intra-op thread per stream (`torch.set_num_threads(1)`) the cores never wait for each
        other at the barrier every operator ends with, which is what costs most on a small shared CPU.
        """
        n = len(tok.ids)
        out = np.zeros((n, self.dim), np.float32)
        lengths = np.fromiter(map(len, tok.ids), np.int64, n)
        batches = list(token_budget_batches(lengths, batch_tokens, max_batch_size))

        def run(idx: np.ndarray) -> None:
            with torch.inference_mode():
                vec = self.forward_ids([tok.ids[i] for i in idx], tok.pool_start[idx]).float()
                if self.normalize:
                    vec = F.normalize(vec, dim=-1)
                out[idx] = vec.cpu().numpy()

        if streams > 1 and len(batches) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(streams, thread_name_prefix="encode") as pool:
                for _ in pool.map(run, batches):
                    pass
        else:
            for idx in batches:
                run(idx)
        if stats is not None:
            stats["real_tokens"] = stats.get("real_tokens", 0) + int(lengths.sum())
            stats["padded_tokens"] = stats.get("padded_tokens", 0) + sum(int(lengths[b].max()) * len(b) for b in batches)
            stats["batches"] = stats.get("batches", 0) + len(batches)
        return out

    def encode(self, texts: list[str], batch_tokens: int = 16384, max_batch_size: int = 512) -> np.ndarray:
        """Captions → float32 [n, dim] (L2-normalised unless normalize=False)."""
        return self.encode_tokenized(self.captions(texts), batch_tokens, max_batch_size)
