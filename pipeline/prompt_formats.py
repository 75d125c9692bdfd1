"""Prompt formats: how a caption is wrapped before a decoder teacher reads it, as llm2vec does it.

`none` feeds the caption as it is (the tokenizer's own special tokens around it, e.g. BOS).
The `llm2vec-*` formats reproduce llm2vec 0.2.3 (`LLM2Vec.encode`, which the official LLM2CLIP extraction
`llm2clip/data/extract_embedding.py` runs with `pooling_mode="mean", max_length=512, doc_max_length=512,
skip_instruction=True`) caption by caption:

* `_convert_to_str(instruction, caption)` builds `"{instruction.strip()} !@#$%^&*(){caption}"` (or just
  `"!@#$%^&*(){caption}"`), then `prepare_for_tokenization` wraps the whole string in the model's user turn
  (`PRE + text.strip() + POST`); for Llama-3 chat models (chosen by `config._name_or_path`, which the official
  extraction sets to "meta-llama/Meta-Llama-3-8B-Instruct"):
  `<|start_header_id|>user<|end_header_id|>\\n\\n` + caption + `<|eot_id|>`.
* `tokenize` splits the string at the separator: the pieces joined (every separator removed) are tokenized with
  the tokenizer's special tokens (BOS), truncated to `max_length` tokens (the tokenizer's truncation side, right
  by default); the second piece (caption + POST) is tokenized alone, without special tokens and also capped at
  `max_length`, and its length n marks the embed mask: the **last n tokens** of the sequence (llm2vec pads on
  the left).
* `get_pooling` with `skip_instruction=True` averages the last hidden state over those n tokens: the caption's
  tokens and POST (`<|eot_id|>`); BOS, the header and an instruction are attended to, not pooled. No
  normalisation (l2c normalises unless `--no-normalize`).

Whitespace: the caption reaches the tokenizer as written, except that `text.strip()` removes its trailing
whitespace; leading whitespace stays (the separator sits before it), and newlines, blank lines, runs of
spaces, tabs and non-ASCII inside it are tokenized as they are. The caption's first tokens may merge with the
header's `\\n\\n` (a caption starting with a newline); n still counts the caption + POST tokenized alone, so the
pooled span is the last n tokens whatever the merge made of the boundary, as in llm2vec.

Odd cases, reproduced as llm2vec has them: a caption holding the separator `!@#$%^&*()` loses every copy of it
and n counts only the text up to the first copy (the last n tokens are still pooled); a caption starting with it
leaves n = 0, and llm2vec's `last_hidden_states[i, -0:]` then averages the whole sequence (l2c pools every
token; llm2vec also takes a batch's left padding, which l2c has none of).

Long captions: llm2vec's `_convert_to_str` cuts a caption to whole words (`" ".join(text.split()[:k])`, which
would also collapse its whitespace) while its token count exceeds `doc_max_length`, but it counts tokens after
truncating at `max_length`; with `doc_max_length >= max_length` (the official 512/512, and l2c's only setting)
the count never exceeds the limit, the cut never fires, whatever the caption's length in words or tokens, and a
caption is simply truncated with the whole sequence at `max_length`. When the caption + POST alone reach
`max_length` tokens, the pooled span is the last `max_length` tokens: with header tokens in front, part of the
header is pooled and POST is cut off. l2c reproduces exactly that (tests/interop/ checks paragraph captions,
captions past 512 tokens and past 512 words against llm2vec itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from l2c.errors import L2CError

SEPARATOR = "!@#$%^&*()"  # llm2vec's mark between instruction and text


@dataclass(frozen=True)
class PromptFormat:
    name: str
    pre: str
    post: str
    # Marker strings that must be single tokens of the tokenizer (else the format does not fit the model).
    tokens: tuple[str, ...] = ()
    models: str = ""


FORMATS: dict[str, PromptFormat | None] = {
    "none": None,
    "llm2vec-llama3": PromptFormat(
        "llm2vec-llama3", "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Llama-3 / 3.1 / 3.2 Instruct teachers (the released LLM2CLIP Llama-3 teachers)",
    ),
    "llm2vec-mistral": PromptFormat(
        "llm2vec-mistral", "[INST] ", " [/INST]", (), "Mistral-7B-Instruct-v0.2, Llama-2-7b-chat",
    ),
    "llm2vec-gemma2": PromptFormat(
        "llm2vec-gemma2", "<bos><start_of_turn>user\n", "<end_of_turn>", ("<bos>", "<start_of_turn>", "<end_of_turn>"),
        "gemma-2-9b-it",
    ),
    "llm2vec-qwen2": PromptFormat(
        "llm2vec-qwen2", "<|im_start|>user\n", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
        "Qwen2-1.5B/7B-Instruct",
    ),
}  # fmt: skip
NAMES = tuple(FORMATS)


def get_format(name: str | None) -> PromptFormat | None:
    """The format called `name` (None for `none`); an unknown name is an `L2CError` listing the known ones."""
    if name is None or name == "none":
        return None
    if name not in FORMATS:
        raise L2CError(f"unknown --prompt-format {name!r}; known formats: {', '.join(NAMES)}")
    return FORMATS[name]


def check_tokenizer(fmt: PromptFormat | None, tokenizer, model: str = "") -> None:
    """Refuse a format whose marker tokens the tokenizer does not have (they would be read as plain text)."""
    if fmt is None:
        return
    vocab = tokenizer.get_vocab()
    missing = [t for t in fmt.tokens if t not in vocab]
    if missing:
        raise L2CError(
            f"--prompt-format {fmt.name} needs the special tokens {list(fmt.tokens)}, but the tokenizer of "
            f"{model or 'this model'} lacks {missing}: the format is for {fmt.models}. Use --prompt-format none "
            f"or the format of this model's family ({', '.join(NAMES)})"
        )


def wrap(fmt: PromptFormat, caption: str, instruction: str = "") -> tuple[str, str]:
    """(the whole string fed to the tokenizer, the pooled tail), built as llm2vec's `_convert_to_str`,
    `prepare_for_tokenization` and `tokenize` build them, step for step (see the module docstring)."""
    text = f"{instruction.strip()} {SEPARATOR}{caption}" if instruction else f"{SEPARATOR}{caption}"
    pieces = (fmt.pre + text.strip() + fmt.post).split(SEPARATOR)
    return "".join(pieces), pieces[1] if len(pieces) > 1 else ""
