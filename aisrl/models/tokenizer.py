"""A character-level tokenizer for the procedural tasks, saved in the Hugging Face format.

Invariant: one token per character. The vocabulary is fixed and ordered (special tokens first,
then newline, then printable ASCII 32..126), so token ids never depend on data, and a directory
written by `save_char_tokenizer` loads unchanged with `transformers.AutoTokenizer` and with vLLM.
Encoding prepends `<bos>`; decoding concatenates characters (no spaces inserted between tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
NEWLINE = "\n"
CHARACTERS = (NEWLINE, *(chr(c) for c in range(32, 127)))
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)
NEWLINE_ID = VOCAB[NEWLINE]
VOCAB_SIZE = len(VOCAB)
MAX_LENGTH = 128


def build_char_tokenizer() -> Tokenizer:
    """The `tokenizers` object: every character is its own word, `<bos>` is prepended on encode."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    # "[\s\S]" matches every character, newline included (Oniguruma has no (?s)).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_char_tokenizer(out_dir: str | Path, model_max_length: int = MAX_LENGTH) -> Path:
    """Writes `tokenizer.json` and `tokenizer_config.json` (and the special tokens map) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation pads prompts on the left
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def encode(text: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """Token ids of text with `<bos>` first; a character outside the vocabulary is an error, never `<unk>`."""
    unknown = sorted({c for c in text if c not in VOCAB})
    if unknown:
        raise ValueError(f"text has characters outside the tokenizer's vocabulary: {unknown!r}")
    return (tokenizer or build_char_tokenizer()).encode(text).ids
