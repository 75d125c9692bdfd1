"""--prompt-format and released llm2vec-style teacher directories, in the main venv (the comparison with llm2vec
itself is tests/interop/, `make test-interop`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2c.errors import L2CError
from l2c.pipeline.encoder import (
    BIDIRECTIONAL_TYPES,
    CaptionTokenizer,
    TextEncoder,
    default_prompt_format,
    load_text_model,
    make_bidirectional,
    read_encoder_settings,
    save_encoder_settings,
)
from l2c.pipeline.prompt_formats import NAMES, get_format, wrap

LLAMA3 = get_format("llm2vec-llama3")
HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def released(tmp_path_factory, shared_data):  # its tokenizer is trained on the shared captions
    """A tiny Llama-3-style teacher in the released layout: LlamaBiModel + auto_map, no remote-code file."""
    from tests.interop.data import make_released_teacher

    return make_released_teacher(tmp_path_factory.mktemp("released"))


def test_wrap_is_llm2vecs_string_handling():
    # The separator sits before the caption: leading whitespace kept, trailing stripped (text.strip()).
    assert wrap(LLAMA3, " a dog  ") == (HEADER + " a dog<|eot_id|>", " a dog<|eot_id|>")
    assert wrap(LLAMA3, "a dog", "  Represent the caption: ") == (
        HEADER + "Represent the caption: a dog<|eot_id|>", "a dog<|eot_id|>")  # fmt: skip
    assert wrap(LLAMA3, "\n\na\n\n b\t") == (HEADER + "\n\na\n\n b<|eot_id|>", "\n\na\n\n b<|eot_id|>")
    assert wrap(LLAMA3, "a !@#$%^&*() b") == (HEADER + "a  b<|eot_id|>", "a ")  # llm2vec's separator
    assert wrap(get_format("llm2vec-mistral"), "a cat") == ("[INST] a cat [/INST]", "a cat [/INST]")
    assert wrap(get_format("llm2vec-qwen2"), "a cat")[0] == "<|im_start|>user\na cat<|im_end|>"
    assert wrap(get_format("llm2vec-gemma2"), "a cat")[0] == "<bos><start_of_turn>user\na cat<end_of_turn>"


def byte_tokenizer():
    """Llama-3's pre-tokenizer (its split pattern, then byte-level) over a BPE of the 256 byte symbols with
    only two merges, a newline pair (ĊĊ) and a space pair (ĠĠ), Llama-3's special tokens and BOS: small enough
    to derive its tokens by hand, and it keeps what whitespace does to Llama-3's pre-tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tests.interop.reference import LLAMA3_SPLIT, SPECIAL

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"ĊĊ": len(vocab), "ĠĠ": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ"), ("Ġ", "Ġ")]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")  # fmt: skip


# BOS, the header's special tokens, "user" byte by byte, and the header's "\n\n" (one merged token).
BYTE_HEADER = ["<|begin_of_text|>", "<|start_header_id|>", "u", "s", "e", "r", "<|end_header_id|>", "ĊĊ"]
WHITESPACE_CASES = [  # caption, its tokens after the header (eot included), how many are pooled
    ("A dog\n\nruns", ["A", "Ġ", "d", "o", "g", "ĊĊ", "r", "u", "n", "s", "<|eot_id|>"], 11),  # paragraph break kept
    ("A dog\nruns", ["A", "Ġ", "d", "o", "g", "Ċ", "r", "u", "n", "s", "<|eot_id|>"], 11),
    ("A   dog", ["A", "ĠĠ", "Ġ", "d", "o", "g", "<|eot_id|>"], 7),  # a run of spaces: "  " then " dog"
    ("A\tdog", ["A", "ĉ", "d", "o", "g", "<|eot_id|>"], 6),  # a tab joins the next word's pre-token
    ("  A dog", ["Ġ", "Ġ", "A", "Ġ", "d", "o", "g", "<|eot_id|>"], 8),  # leading whitespace kept and pooled
    ("A dog \n\t ", ["A", "Ġ", "d", "o", "g", "<|eot_id|>"], 6),  # trailing whitespace stripped
    ("\nA dog", ["Ċ", "A", "Ġ", "d", "o", "g", "<|eot_id|>"], 7),  # after the header's ĊĊ (3 newlines: ĊĊ Ċ)
    ("café 東🐱", ["c", "a", "f", "Ã", "©", "Ġ", "æ", "Ŀ", "±", "ð", "Ł", "Ĳ", "±", "<|eot_id|>"], 14),  # UTF-8 bytes
    # llm2vec's separator in a caption: every copy removed, n counts the text up to the first ("a ": 2 tokens).
    ("a !@#$%^&*() b", ["a", "Ġ", "Ġ", "b", "<|eot_id|>"], 2),
    ("!@#$%^&*()x", ["x", "<|eot_id|>"], 10),  # n = 0: llm2vec's [-0:] averages every token
]


@pytest.mark.parametrize("caption,tokens,pooled", WHITESPACE_CASES)
def test_llama3_tokens_of_whitespace_and_non_ascii(caption, tokens, pooled):
    """Token ids and pooled span as llm2vec 0.2.3 makes them (tests/interop/ checks the same against it)."""
    tok = byte_tokenizer()
    got = CaptionTokenizer(tok, 64, "", "llm2vec-llama3")([caption])
    assert tok.convert_ids_to_tokens(got.ids[0]) == BYTE_HEADER + tokens
    assert got.n_tokens[0] - got.pool_start[0] == pooled and not got.truncated[0]


def test_llama3_tokens_past_max_length():
    """More words and tokens than max_length (16): the whole sequence is cut, never the caption by words."""
    tok = byte_tokenizer()
    ct = CaptionTokenizer(tok, 16, "", "llm2vec-llama3")
    got = ct(["a b c d", "a b\n\nc  d e", "a b c d e f g h i j " * 4])
    pieces = [tok.convert_ids_to_tokens(x) for x in got.ids]
    assert pieces[0] == BYTE_HEADER + ["a", "Ġ", "b", "Ġ", "c", "Ġ", "d", "<|eot_id|>"]  # exactly 16: whole
    # caption + eot: 11 tokens, the sequence 19: cut at 16, eot lost, the last 11 pooled (2 header tokens too).
    assert pieces[1] == BYTE_HEADER + ["a", "Ġ", "b", "ĊĊ", "c", "Ġ", "Ġ", "d"]
    # 40 words: caption + eot alone past 16, all 16 tokens pooled (BOS too).
    assert pieces[2] == BYTE_HEADER + ["a", "Ġ", "b", "Ġ", "c", "Ġ", "d", "Ġ"]
    assert got.n_tokens.tolist() == [16, 16, 16] and got.truncated.tolist() == [False, True, True]
    assert (got.n_tokens - got.pool_start).tolist() == [8, 11, 16]


def test_unknown_format_and_wrong_tokenizer_are_refused(minilm_path):
    from transformers import AutoTokenizer

    from l2c.pipeline.embed_job import EmbedConfig

    with pytest.raises(L2CError, match="known formats: none, llm2vec-llama3"):
        get_format("llama3")
    with pytest.raises(L2CError, match="unknown --prompt-format"):
        EmbedConfig(sources=["x.jsonl"], out="o", prompt_format="chatml").validate()
    with pytest.raises(L2CError, match=r"lacks \['<\|start_header_id\|>'"):
        CaptionTokenizer(AutoTokenizer.from_pretrained(minilm_path), 64, "", "llm2vec-llama3")
    assert NAMES == ("none", "llm2vec-llama3", "llm2vec-mistral", "llm2vec-gemma2", "llm2vec-qwen2")


def test_released_layout_loads_and_gets_llama3_by_default(released):
    assert not list(released.glob("*.py"))
    net, tok, info = load_text_model(released, dtype="float32", device="cpu")
    assert type(net).__name__ == "LlamaModel" and info["released_class"] == "LlamaBiModel"
    assert info["prompt_format"] == "llm2vec-llama3" and info["bidirectional"]
    assert default_prompt_format(released)[0] == "llm2vec-llama3"
    ids = torch.tensor([tok("a dog runs on the beach")["input_ids"]])
    changed = ids.clone()
    changed[0, -1] = ids[0, 2]
    with torch.no_grad():  # bidirectional: the last token reaches the first
        assert not torch.allclose(net(input_ids=ids).last_hidden_state[0, 0],
                                  net(input_ids=changed).last_hidden_state[0, 0], atol=1e-6)  # fmt: skip


def test_llama3_format_pools_caption_and_eot_not_bos_or_header(released):
    enc = TextEncoder.load(released, dtype="float32", device="cpu", normalize=False)
    assert enc.prompt_format == "llm2vec-llama3"
    tok = enc.captions(["a dog runs on the beach", "two cats"])
    for ids, start in zip(tok.ids, tok.pool_start, strict=True):
        assert start == 5 and ids[0] == enc.tokenizer.bos_token_id
        assert enc.tokenizer.convert_ids_to_tokens(ids[1:5:2]) == ["<|start_header_id|>", "<|end_header_id|>"]
        assert enc.tokenizer.convert_ids_to_tokens(ids[-1]) == "<|eot_id|>"
    got = enc.encode(["a dog runs on the beach", "two cats"])
    with torch.no_grad():
        for i, ids in enumerate(tok.ids):
            h = enc.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            np.testing.assert_allclose(got[i], h[5:].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    none = TextEncoder.load(released, dtype="float32", device="cpu", normalize=False, prompt_format="none")
    assert none.captions(["two cats"]).pool_start[0] == 0 and none.prompt_format == "none"


def test_truncation_follows_llm2vec(released):
    """Whole sequence cut at max_length; the pooled span is the last min(len(caption + eot), max_length)."""
    from transformers import AutoTokenizer

    ct = CaptionTokenizer(AutoTokenizer.from_pretrained(released), 32, "", "llm2vec-llama3")
    long = " ".join(["a brown dog runs"] * 40)
    out = ct(["a dog", long])
    assert out.truncated.tolist() == [False, True] and out.n_tokens[1] == 32
    assert out.pool_start[1] == 0  # caption + eot alone exceed 32: all 32 tokens pooled, BOS included
    assert out.ids[1][:5] == out.ids[0][:5]  # the header is kept, the end (eot) is cut off


def test_unsupported_architecture_is_refused_naming_the_supported(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c.update(architectures=["GPT2BiModel"], auto_map={"AutoModel": "modeling_gpt2_bi.GPT2BiModel"})
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(L2CError, match=r"GPT2BiModel \(model_type 'gpt2'\).*Supported model types: .*llama"):
        load_text_model(tmp_path, dtype="float32", device="cpu")


def tiny_config(model_type: str):
    from transformers import AutoConfig

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    if model_type.endswith("moe") or model_type == "mixtral":
        kw.update(num_experts=2, num_local_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32)  # fmt: skip
    return AutoConfig.for_model(model_type, **kw)


@pytest.mark.parametrize("model_type", BIDIRECTIONAL_TYPES)
def test_every_supported_type_becomes_bidirectional(model_type):
    from transformers import AutoModel

    torch.manual_seed(0)
    net = make_bidirectional(AutoModel.from_config(tiny_config(model_type), dtype=torch.float32)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    changed = ids.clone()
    changed[0, -1] = 30
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = net(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0, 0]
        b = net(input_ids=changed, attention_mask=mask, use_cache=False).last_hidden_state[0, 0]
    assert not torch.allclose(a, b, atol=1e-6), f"{model_type}: the first token does not see the last"


def test_finetuned_directories_carry_the_format(released, tmp_path):
    save_encoder_settings(tmp_path / "a", pooling="mean", base_model=str(released))
    assert read_encoder_settings(tmp_path / "a")["prompt_format"] == "llm2vec-llama3"  # inherited
    save_encoder_settings(tmp_path / "b", pooling="mean", prompt_format="none", base_model=str(released))
    assert read_encoder_settings(tmp_path / "b")["prompt_format"] == "none"
    save_encoder_settings(tmp_path / "c", pooling="mean")
    assert read_encoder_settings(tmp_path / "c")["prompt_format"] == "none"
    with pytest.raises(L2CError):
        save_encoder_settings(tmp_path / "d", prompt_format="chatml")
    # A directory with the file embeds with the recorded format, whatever its config.
    assert default_prompt_format(tmp_path / "a", config=object()) == (
        "llm2vec-llama3", "model directory (l2c_text_encoder.json)")  # fmt: skip


def test_identity_includes_the_format_and_old_caches_read_as_none(tmp_path):
    from l2c.cache import CacheError, Manifest
    from l2c.pipeline.embed_job import open_manifest
    from l2c.storage import Store

    store = Store(str(tmp_path))
    old = {"model_fingerprint": "f", "engine": "hf", "pooling": "mean", "dim": 8}  # written before formats
    Manifest(settings=old).save(store)
    assert open_manifest(store, {**old, "prompt_format": "none"}, overwrite=False).settings["prompt_format"] == "none"
    with pytest.raises(CacheError, match="prompt_format: cache has 'none', this run 'llm2vec-llama3'"):
        open_manifest(store, {**old, "prompt_format": "llm2vec-llama3"}, overwrite=False)
