"""The captions of the interop tier: real short captions, long dense captions, and paragraph-style dense
captions written for this tier (blank lines, single newlines, runs of spaces, tabs, whitespace at the ends,
accents, CJK, emoji, past 512 tokens and past 512 words). No pytest here: the reference venv imports this too."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def _captions(name: str, n_images: int) -> list[str]:
    out = []
    for line in (SHARED / "data" / name).read_text().splitlines()[:n_images]:
        out += json.loads(line)["captions"]
    return out


def dense_captions() -> list[str]:
    """Long, dense paragraphs of real caption text (Flickr8k train), 30 to 900 words: under, around and
    well over the 512-token limit of the official extraction."""
    sentences = _captions("flickr8k_train_captions.jsonl", 400)
    words = " ".join(s.strip().rstrip(".").strip() + "." for s in sentences).split()
    lengths = [30, 60, 100, 160, 220, 280, 330, 360, 380, 395, 396, 398, 400, 402, 405, 415, 425, 435, 445, 455, 470, 490, 520,
               560, 620, 700, 900]  # fmt: skip
    out, at = [], 0
    for n in lengths:
        out.append(" ".join(words[at : at + n]))
        at += n
    return out


# Paragraph-style dense captions as DOCCI and ShareGPT4V have them, whitespace exactly as written.
PARAGRAPHS = [
    # 0: DOCCI-style, three paragraphs separated by blank lines
    "A wide view of a small harbor at low tide. Five wooden fishing boats lean on their keels in the wet sand, "
    "their hulls painted blue, red and a faded yellow.\n\nIn the background a row of narrow stone houses follows "
    "the curve of the quay. Most of the windows have white shutters, and laundry hangs from a line between two "
    "of the upper windows.\n\nThe sky is overcast and the light is flat, so there are almost no shadows.",
    # 1: single newlines inside a paragraph (hard-wrapped text)
    "A close-up of a chocolate cake on a white plate.\nA single slice has been cut out, showing three dark\n"
    "layers with cream between them.\nA silver fork rests on the right edge of the plate.",
    # 2: runs of spaces
    "A man in a grey suit  waits at a bus stop.   Behind him,    a poster shows a beach at sunset.  "
    "The pavement is wet     and reflects the headlights of a passing car.",
    # 3: tabs and a tabbed list
    "A kitchen counter seen from above.\tOn the left:\ta cutting board with sliced onions.\n"
    "\tIn the middle:\ta glass bowl of eggs.\n\tOn the right:\ta kettle and two mugs.",
    # 4: leading and trailing whitespace around the whole caption
    "   \n\nTwo children fly a red kite on a grassy hill. The string is taut and the kite is high above them, "
    "a small red diamond against pale clouds.\n\n   \t",
    # 5: leading newline only
    "\nA black and white photo of an old steam train crossing a stone viaduct, with a plume of smoke "
    "drifting to the left over the valley.",
    # 6: accents and other Latin letters
    "Une terrasse de café à Montréal : des chaises en rotin, une serveuse qui porte un plateau, et au fond "
    "une enseigne « Crème brûlée ».\n\nIn the foreground a dog naps under a table next to a pair of "
    "espadrilles; a sign in Spanish reads «Año nuevo, señor Muñoz».",
    # 7: CJK text on signs
    "A narrow street in Kyoto at dusk. Paper lanterns hang above the doors, and a wooden sign reads "
    "「京都の古い茶屋」. A second sign in Chinese says 欢迎光临, and a poster on the left has Korean text, "
    "서울 여행.\n\nTwo people in kimonos walk away from the camera.",
    # 8: emoji and symbols
    "A birthday card lying on a table 🎂🎉. The front shows a cartoon cat 🐱 wearing a party hat, and the "
    'handwritten message says "Happy 7th birthday, Léa! ❤️".\n\nNext to the card: three balloons 🎈🎈🎈 '
    "and a half-eaten cupcake.",
    # 9: Windows line endings and a blank line with spaces in it
    "A snowy mountain road with a yellow warning sign.\r\nThe sign shows a deer jumping.\r\n  \r\n"
    "Tire tracks curve around a bend and disappear into the fog.",
    # 10: non-breaking and other Unicode spaces
    "A price tag on a shelf reads 12\u00a0€ for a jar of honey.\u2003Next to it, a smaller tag says "
    "\u00ab bio \u00bb.\u3000The shelf is made of pale wood.",
    # 11: grawlix in a speech bubble (llm2vec's separator characters inside the caption)
    "A comic panel: an angry chef shouts at a burnt pizza, and his speech bubble is full of symbols, "
    "!@#$%^&*(), while a cat watches from the window.",
    # 12: ShareGPT4V-style structured description with a numbered list
    "The image shows a tidy home office.\n\n1. A wooden desk with a laptop, a lamp and a potted cactus.\n"
    "2. A grey office chair pushed slightly back.\n3. A bookshelf with about forty books and a globe.\n\n"
    "Overall, the room looks calm and well organized.",
    # 13: trailing paragraph breaks and spaces only
    "A red tractor pulls a trailer of hay bales across a field at sunset.\n\n\n\n",
]


def paragraph_captions() -> list[str]:
    """The paragraphs alone, then long ones made of them: past 512 tokens with under 512 words, whole
    sequence just past 512 tokens (the eot cut off, part of the header pooled), past 512 words, and
    past 512 words with a run of spaces, a tab and a newline in every line."""
    p = PARAGRAPHS
    frames = "  \n".join(f"Frame {i} of a time-lapse: a dog  runs\tacross the beach." for i in range(80))
    longs = ["\n\n".join(p[:7]), "\n\n".join(p[i] for i in (0, 1, 2, 3, 4, 7)), "\n\n".join(p),
             "\n".join(p[::-1] + p), frames]  # fmt: skip
    return p + longs


def interop_captions() -> list[dict]:
    """Short real captions (Flickr8k dev, COCO val: 5 to 7 per image), long dense ones, paragraph-style ones and
    whitespace at the ends, with keys."""
    rows = []
    for i, c in enumerate(_captions("flickr8k_dev_captions.jsonl", 24)):
        rows.append({"key": f"flickr-{i:04d}", "caption": c, "kind": "short"})
    for i, c in enumerate(_captions("coco_val2017_captions.jsonl", 16)):
        rows.append({"key": f"coco-{i:04d}", "caption": c, "kind": "short"})
    for i, c in enumerate(dense_captions()):
        rows.append({"key": f"dense-{i:04d}", "caption": c, "kind": "dense"})
    for i, c in enumerate(paragraph_captions()):
        rows.append({"key": f"para-{i:04d}", "caption": c, "kind": "paragraph"})
    # Whitespace at the ends: llm2vec keeps the leading and strips the trailing.
    for i, c in enumerate([" A dog runs along the beach .", "Two cats sleep on a sofa   ", "\tA red bus\n"]):
        rows.append({"key": f"edge-{i:04d}", "caption": c, "kind": "edge"})
    return rows


def make_released_teacher(out: Path, seed: int = 0) -> Path:
    """A tiny Llama-3-style teacher in the released layout, built with this venv's transformers (the interop
    tier's own teacher comes from reference.py in .venv-interop): LlamaBiModel + auto_map in config.json, no
    remote-code file, a byte-level BPE tokenizer with the Llama-3 special tokens."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from tests.interop.reference import make_tokenizer, training_text

    texts = training_text(SHARED, 3000)
    header = "<|start_header_id|>user<|end_header_id|>\n\n"
    tok = make_tokenizer(texts + [header + t + "<|eot_id|>" for t in texts[:300]], vocab_size=600)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(seed)
    LlamaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    c = json.loads((out / "config.json").read_text())
    c.update(architectures=["LlamaBiModel"], auto_map={"AutoModel": "modeling_bidirectional_llama_encoder.LlamaBiModel"})
    (out / "config.json").write_text(json.dumps(c))
    return out
