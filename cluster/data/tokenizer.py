"""Tokenizers for the offline datasets: raw UTF-8 bytes, or a byte-level BPE trained locally.

Both expose the same small API (`name`, `vocab_size`, `eos_id`, `encode`, `decode`), and both
can encode any text, so a dataset never contains an unknown token. The eos id separates
documents in the token stream; `encode` never produces it from text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

EOS_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus `eos_id = 256`: no training, no file, no unknowns."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # A model may emit eos or cut a multi-byte character in half: neither may raise.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (the `tokenizers` package) with `<|endoftext|>` as eos.

    Byte-level means the 256 byte symbols are always in the vocabulary, so every text encodes
    and `decode(encode(text)) == text` exactly.
    """

    name = "bpe"

    def __init__(self, tok) -> None:
        eos_id = tok.token_to_id(EOS_TEXT)
        if eos_id is None:
            raise ValueError(f"BPE tokenizer has no {EOS_TEXT!r} token")
        # Text that happens to contain "<|endoftext|>" is encoded as ordinary bytes, so only the
        # dataset writer decides where documents end (as with ByteTokenizer).
        tok.encode_special_tokens = True
        self._tok = tok
        self.eos_id = eos_id
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train offline on `texts`; the result may have fewer than `vocab_size` tokens when the
        text has too few distinct pairs to merge."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise ValueError(f"vocab_size={vocab_size} must be at least {len(alphabet) + 1} "
                             "(256 byte symbols plus eos)")
        tok = HFTokenizer(models.BPE())
        # No prefix space: it would make decode(encode(text)) differ from text.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS_TEXT], initial_alphabet=alphabet,
            show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, path: str | Path) -> None:
        """Write the `tokenizers` JSON file (conventionally `tokenizer.json`)."""
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.eos_id]
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a dataset directory was written with (named in its meta.json)."""
    from cluster.data.tokens import (
        read_meta,  # cluster.data does not import this module: no cycle
    )

    meta = read_meta(data_dir, check_shards=False)
    if meta.tokenizer == "byte":
        tok = ByteTokenizer()
    elif meta.tokenizer == "bpe":
        path = Path(data_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"data path '{data_dir}' uses a BPE tokenizer but has no "
                                    "tokenizer.json")
        tok = BPETokenizer.load(path)
    else:
        raise ValueError(f"data path '{data_dir}': unknown tokenizer {meta.tokenizer!r} in "
                         "meta.json (expected 'byte' or 'bpe')")
    if (tok.vocab_size, tok.eos_id) != (meta.vocab_size, meta.eos_id):
        raise ValueError(
            f"data path '{data_dir}': tokenizer has vocab_size={tok.vocab_size}, "
            f"eos_id={tok.eos_id} but meta.json says {meta.vocab_size}, {meta.eos_id}")
    return tok


__all__ = ["ByteTokenizer", "BPETokenizer", "EOS_TEXT", "Tokenizer", "load_tokenizer"]
