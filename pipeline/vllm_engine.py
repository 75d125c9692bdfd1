"""The vLLM engine for `embed-captions --engine vllm`: same inputs, same vectors as the hf engine.

`VllmEncoder(spec)` offers `encode_tokenized(tok, batch_tokens, max_batch_size, stats)` like
`TextEncoder`. It runs vLLM's pooling runner on the token ids that `CaptionTokenizer` made
(`TokensPrompt`), so tokenization, truncation and the n_tokens/truncated columns are the hf path's own.

How each setting maps onto vLLM (0.32):
  pooling mean/cls/last + normalize  `PoolerConfig(task="embed", seq_pooling_type=MEAN|CLS|LAST,
                                     use_activation=normalize)`: vLLM pools and normalises on the device.
  bidirectional decoder (LLM2Vec)    `hf_overrides={"is_causal": False}`: vLLM's Llama/Mistral/Qwen2/Qwen3/
                                     Gemma3 layers then build ENCODER_ONLY (non-causal) attention. After
                                     loading, every attention layer's type is checked (or, where vLLM
                                     cannot show its layers, the model type against that list); a model
                                     class that ignores the switch is refused, never run causal silently.
  --instruction, --prompt-format     vLLM's poolers always pool the whole prompt. With an instruction, or
                                     an llm2vec prompt format (whose header tokens are attended to, not
                                     pooled), the engine asks for every token's hidden state
                                     (`task="token_embed"`, ALL pooling, no activation) and pools each
                                     caption's span (`pool_start`) on the host.
  released llm2vec layouts           a config naming `LlamaBiModel` (remote code) is loaded as vLLM's own
                                     class for the model type (`hf_overrides` architectures), weights as they are.

What vLLM cannot do here, and what the engine does about it:
  * keep a prefix out of MEAN/CLS/LAST pooling: not supported; the token_embed route above works but
    moves [tokens, dim] per caption to the host (slower, more memory) instead of one vector;
  * run a LoRA adapter on a pooling model the way the hf engine merges it: refused; point --model at the
    merged directory `finetune-text` writes (OUT/model/);
  * sequences longer than the model's max_position_embeddings (RoPE decoders run past it under hf):
    refused with the limit named; the packaged MiniLM's sentence-transformers cap of 256 tokens is lifted
    back to BERT's 512 positions so both engines see the same tokens;
  * on CPU, attention head sizes other than 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512: refused
    before the model loads (the CPU attention kernel has no other sizes);
  * report batching: vLLM schedules and packs sequences itself, there is no padding, so the shard's
    stats record padded_tokens == real_tokens and one batch per engine call.

The manifest records `engine` (and `engine_version`); `engine` is an identity setting, so a rerun with
the other engine into the same cache is refused (use --overwrite or another --out): the two engines agree
to cosine >= 0.999, not bit for bit, and a cache holds vectors of one engine only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# vLLM's seq-pooling names for the project's pooling modes.
SEQ_POOLING = {"mean": "MEAN", "cls": "CLS", "last": "LAST"}
# Decoder model types whose vLLM 0.32 layers read config.is_causal (used when the loaded layers cannot be
# inspected, e.g. with the engine core in a separate process).
HONOURS_IS_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}


def _attention_types(model) -> list[str]:
    """Types ("decoder", "encoder_only", ...) of a loaded vLLM model's attention layers (those holding a
    kernel `impl`; the model class itself declares a nominal type); runs inside the worker."""
    kinds = (m.attn_type for m in model.modules() if hasattr(m, "attn_type") and hasattr(m, "impl"))
    return sorted({str(getattr(k, "value", k)) for k in kinds})


def _engine_defaults() -> None:
    """Environment vLLM reads at import: engine core in this process (a Ray actor), a small CPU KV space."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pool_tokens(hidden: np.ndarray, start: int, pooling: str) -> np.ndarray:
    """One caption's [T, H] token states → [H] over tokens[start:], as `encoder.pool` does."""
    if pooling == "mean":
        return hidden[start:].mean(0)
    if pooling == "cls":
        return hidden[start]
    if pooling == "last":
        return hidden[-1]
    raise ValueError(f"pooling must be one of {tuple(SEQ_POOLING)}, got {pooling!r}")


class VllmEncoder:
    """vLLM pooling runner behind the `TextEncoder.encode_tokenized` interface.

    `spec` is what `embed_job.resolve_settings` hands the actors: model_path, pooling, normalize,
    max_length, dtype, instruction, lora, bidirectional, batch_tokens, max_batch_size; optional `vllm_kwargs`
    are passed on to `vllm.LLM` (the GPU benchmark uses load_format="dummy").
    """

    def __init__(self, spec: dict):
        from transformers import MODEL_MAPPING, AutoConfig

        from l2c.models import resolve_model
        from l2c.pipeline.encoder import (
            default_prompt_format,
            is_decoder_config,
            read_encoder_settings,
            released_class,
            resolve_dtype,
        )

        path = resolve_model(spec["model_path"])
        if spec.get("lora") or ((path / "adapter_config.json").exists() and not (path / "config.json").exists()):
            raise ValueError(
                "--engine vllm does not merge LoRA adapters: pass the merged model directory that "
                "finetune-text writes (OUT/model/) as --model, or use --engine hf"
            )
        saved = read_encoder_settings(path)
        config = AutoConfig.from_pretrained(path)
        self.path = path
        self.model_type = config.model_type
        self.is_decoder = is_decoder_config(config)
        bidirectional = spec.get("bidirectional")
        if bidirectional is None:
            bidirectional = saved.get("bidirectional", self.is_decoder)
        self.bidirectional = bool(bidirectional) if self.is_decoder else True
        self.pooling = spec.get("pooling") or saved.get("pooling", "mean")
        if self.pooling not in SEQ_POOLING:
            raise ValueError(f"pooling must be one of {tuple(SEQ_POOLING)}, got {self.pooling!r}")
        self.normalize = bool(spec.get("normalize", True))
        instruction = spec.get("instruction")
        self.instruction = saved.get("instruction", "") if instruction is None else instruction
        self.prompt_format = spec.get("prompt_format") or default_prompt_format(path, config, saved)[0]
        self.released_class = released_class(config)
        self.max_length = int(spec.get("max_length", 512))
        self.dim = int(config.hidden_size)
        if spec.get("dim") not in (None, self.dim):
            raise ValueError(f"spec says dim {spec['dim']}, the model at {path} has {self.dim}")

        _engine_defaults()
        from vllm import LLM
        from vllm.config import PoolerConfig
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        dtype = spec.get("dtype", "auto")
        if dtype == "auto":
            dtype = str(resolve_dtype("auto", "cpu" if on_cpu else "cuda")).replace("torch.", "")
        self.dtype = dtype
        if on_cpu:
            self._check_cpu_head_size(config)
        positions = getattr(config, "max_position_embeddings", None)
        self.max_model_len = min(self.max_length, int(positions)) if positions else self.max_length

        # Without an instruction vLLM pools whole prompts; with one, every token comes back for host pooling.
        self.task = "token_embed" if self.instruction or self.prompt_format != "none" else "embed"
        if self.task == "embed":
            pooler = PoolerConfig(task="embed", seq_pooling_type=SEQ_POOLING[self.pooling],
                                  use_activation=self.normalize)  # fmt: skip
        else:
            pooler = PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False)
        batch_tokens = int(spec.get("batch_tokens") or 16384)
        max_seqs = int(spec.get("max_batch_size") or 512)
        kwargs = dict(
            model=str(path), runner="pooling", dtype=dtype, max_model_len=self.max_model_len,
            pooler_config=pooler, enable_prefix_caching=False, seed=0,
            max_num_batched_tokens=max(batch_tokens, self.max_model_len), max_num_seqs=max_seqs,
            enforce_eager=on_cpu,  # torch.compile of the whole model costs minutes on a CPU
        )  # fmt: skip
        if self.is_decoder:
            kwargs["hf_overrides"] = {"is_causal": not self.bidirectional}
            if self.released_class:  # LlamaBiModel (remote code) → vLLM's LlamaModel on the same weights
                kwargs["hf_overrides"]["architectures"] = [MODEL_MAPPING[type(config)].__name__]
        kwargs.update(spec.get("vllm_kwargs") or {})  # e.g. load_format="dummy" for benchmarks
        # The packaged MiniLM's sentence-transformers config caps vLLM at 256 tokens; BERT has 512 positions,
        # and max_model_len never exceeds max_position_embeddings here, so lifting the cap is safe.
        old = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        try:
            self.llm = LLM(**kwargs)
        finally:
            if old is None:
                os.environ.pop("VLLM_ALLOW_LONG_MAX_MODEL_LEN", None)
            else:
                os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = old
        self.attention_types = self._check_attention()

    @classmethod
    def load(cls, model: str | Path, pooling: str | None = None, normalize: bool = True, max_length: int = 512,
             dtype: str = "auto", instruction: str | None = None, bidirectional: bool | None = None,
             batch_tokens: int = 16384, max_batch_size: int = 512,
             prompt_format: str | None = None) -> VllmEncoder:  # fmt: skip
        """Like `TextEncoder.load`, for direct use outside a job."""
        spec = dict(model_path=str(model), pooling=pooling, normalize=normalize, max_length=max_length, dtype=dtype,
                    instruction=instruction, bidirectional=bidirectional, lora=None, batch_tokens=batch_tokens,
                    max_batch_size=max_batch_size, prompt_format=prompt_format)  # fmt: skip
        return cls(spec)

    def _check_cpu_head_size(self, config) -> None:
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = list(CPUAttentionBackend.get_supported_head_sizes())
        except (ImportError, AttributeError):
            return
        heads = getattr(config, "num_attention_heads", None)
        head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        if head is not None and head not in sizes:
            raise ValueError(
                f"vLLM's CPU attention supports head sizes {sizes}; {self.path} has {head} "
                f"(hidden_size {config.hidden_size} / {heads} heads). Use --engine hf for this model."
            )

    def _check_attention(self) -> list[str]:
        """Refuse a model whose vLLM attention layers did not take the causal/bidirectional switch."""
        try:
            kinds = sorted({k for worker in self.llm.apply_model(_attention_types) for k in worker})
        except Exception:  # engine core in another process refuses pickled functions: use the known list
            kinds = []
        want = "encoder_only" if self.bidirectional else "decoder"
        unknown = not kinds and self.bidirectional and self.model_type not in HONOURS_IS_CAUSAL
        if self.is_decoder and (unknown or (kinds and kinds != [want])):
            self.shutdown()
            raise ValueError(
                f"vLLM built {kinds or 'uninspectable'} attention for {self.path} ({self.model_type}), this run "
                f"needs {want!r} (bidirectional={self.bidirectional}): vLLM's class for this architecture "
                "ignores config.is_causal, or cannot be shown to honour it. Use --engine hf."
            )
        return kinds

    def settings(self) -> dict:
        return {"engine": "vllm", "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "instruction": self.instruction, "prompt_format": self.prompt_format,
                "bidirectional": self.bidirectional, "is_decoder": self.is_decoder,
                "dtype": self.dtype, "dim": self.dim, "task": self.task, "max_model_len": self.max_model_len}  # fmt: skip

    def encode_tokenized(self, tok, batch_tokens: int = 16384, max_batch_size: int = 512,
                         stats: dict | None = None) -> np.ndarray:  # fmt: skip
        """Encode pre-tokenized captions (a `Tokenized`); rows keep input order. vLLM batches by itself."""
        from vllm.inputs import TokensPrompt

        n = len(tok.ids)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        lengths = np.asarray([len(x) for x in tok.ids], np.int64)
        if int(lengths.max()) > self.max_model_len:
            i = int(lengths.argmax())
            raise ValueError(
                f"caption {i} has {int(lengths[i])} tokens; vLLM runs this model up to {self.max_model_len} "
                f"(its max_position_embeddings). Use --max-length {self.max_model_len} or --engine hf."
            )
        pool_start = np.asarray(tok.pool_start, np.int64)
        if self.task == "embed" and pool_start.any():
            raise ValueError("these captions carry an instruction or prompt format; load the engine with the same "
                             "--instruction and --prompt-format")
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in tok.ids]
        results = self.llm.encode(prompts, pooling_task=self.task, use_tqdm=False)
        for i, r in enumerate(results):
            data = r.outputs.data.float().cpu().numpy()
            if self.task == "token_embed":
                if data.shape[0] != lengths[i]:  # pool_start counts the ids: one state per id, or no span
                    raise ValueError(f"vLLM returned {data.shape[0]} token states for caption {i} of {lengths[i]} "
                                     "tokens; its pooled span cannot be the hf engine's")  # fmt: skip
                data = pool_tokens(data, int(pool_start[i]), self.pooling)
                if self.normalize:
                    data = data / max(float(np.linalg.norm(data)), 1e-12)
            out[i] = data
        if stats is not None:
            real = int(lengths.sum())
            stats["real_tokens"] = stats.get("real_tokens", 0) + real
            stats["padded_tokens"] = stats.get("padded_tokens", 0) + real  # packed: no padding
            stats["batches"] = stats.get("batches", 0) + 1
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        """Captions → float32 [n, dim], tokenized exactly as the hf engine does."""
        from transformers import AutoTokenizer

        from l2c.pipeline.encoder import CaptionTokenizer

        if not hasattr(self, "captions"):
            self.captions = CaptionTokenizer(AutoTokenizer.from_pretrained(self.path), self.max_length,
                                             self.instruction, self.prompt_format)  # fmt: skip
        return self.encode_tokenized(self.captions(texts))

    def shutdown(self) -> None:
        """Stop the engine and free its memory (the object is unusable afterwards)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        import gc

        gc.collect()
