"""Tokenizers for the offline datasets: raw UTF-8 bytes, a byte-level BPE trained locally, or any
tokenizer.json (JSONTokenizer).

Both expose the same small API (`name`, `vocab_size`, `eos_id`, `encode`, `decode`), and both
can encode any text, so a dataset never contains an unknown token. The eos id separates
documents in the token stream; `encode` never produces it from text.
"""

from __future__ import annotations

import json
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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text in one call (Rust threads: RAYON_NUM_THREADS caps them)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.eos_id]
        return self._tok.decode(ids, skip_special_tokens=True)


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as {"content": ...}.
    return value.get("content") if isinstance(value, dict) else value


class JSONTokenizer:
    """Any `tokenizers` tokenizer.json (an imported model's, say), with its bos/eos conventions.

    eos and bos come from a `tokenizer_config.json` beside the file (`eos_token`, `bos_token`,
    `add_bos_token`: the Hugging Face convention) when there is one; otherwise eos is the first
    of EOS_CANDIDATES in the vocabulary, and bos is prepended when the tokenizer's own
    post-processor prepends a special token (as Llama's does). Documents are written as
    [bos] text eos, so a model trained here sees the framing its tokenizer expects.
    """

    name = "json"

    def __init__(self, tok, eos_token: str, bos_token: str | None = None, add_bos: bool = False,
                 source: str = "") -> None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {source or ''}: eos token {eos_token!r} is not in its vocabulary")
        bos_id = tok.token_to_id(bos_token) if bos_token else None
        if add_bos and bos_id is None:
            raise ValueError(f"tokenizer {source}: add_bos_token is set but bos token {bos_token!r} "
                             "is not in its vocabulary")
        tok.encode_special_tokens = True  # as BPETokenizer: only the writer places eos/bos
        self._tok = tok
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = eos_id
        self.bos_id = bos_id if add_bos else None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_path(cls, path: str | Path) -> JSONTokenizer:
        """`path` is a tokenizer.json or a directory holding one."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer '{path}': no tokenizer.json there; give `byte`, `bpe`, "
                                    "a tokenizer.json or a directory holding one")
        tok = HFTokenizer.from_file(str(file))
        config_file = file.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        eos = _token_text(config.get("eos_token"))
        if eos is None:
            eos = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer '{file}': no eos token found (none of {EOS_CANDIDATES}); put a "
                             "tokenizer_config.json with \"eos_token\" beside it")
        bos = _token_text(config.get("bos_token"))
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            # The tokenizer's own template: does it put a special token in front of the text?
            plain = tok.encode("a", add_special_tokens=False).ids
            framed = tok.encode("a", add_special_tokens=True).ids
            first = framed[0] if len(framed) > len(plain) and framed[1:1 + len(plain)] == plain else None
            add_bos = first is not None
            if add_bos and bos is None:
                bos = tok.id_to_token(first)
        if bos is None and not add_bos:
            bos = next((t for t in BOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        return cls(tok, eos, bos, add_bos, source=str(file))

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path`, and its conventions in tokenizer_config.json beside it."""
        path = Path(path)
        self._tok.save(str(path))
        config = {"eos_token": self.eos_token, "bos_token": self.bos_token,
                  "add_bos_token": self.bos_id is not None}
        path.with_name("tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=True)


class HFTokenizer:
    """A Hugging Face model's `tokenizer.json` with its bos/eos/pad ids (an imported checkpoint).

    The ids live in `special_tokens.json` beside `tokenizer.json`. `encode` adds no special
    tokens (dataset documents are separated by eos, as with the other tokenizers);
    `encode_prompt` adds what the tokenizer's post-processor adds (Llama's bos), as
    `transformers.AutoTokenizer` does by default, for generation.
    """

    name = "hf"
    SIDECAR = "special_tokens.json"

    def __init__(self, tok, eos_id: int, bos_id: int | None = None, pad_id: int | None = None):
        self._tok = tok
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_files(cls, path: str | Path, ids: dict, tokenizer_config: dict) -> HFTokenizer:
        """`ids`: {bos,eos,pad}_token_id from the model config (may be None); the tokenizer
        config's named tokens fill the gaps. A model without any eos gets none invented."""
        from tokenizers import Tokenizer as HFTok

        tok = HFTok.from_file(str(path))

        def named(key: str) -> int | None:
            t = tokenizer_config.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if isinstance(t, str) else None

        eos = ids.get("eos_token_id")
        eos = named("eos_token") if eos is None else eos
        if eos is None:
            raise ValueError(f"{path}: no eos token (neither eos_token_id in config.json/generation_config.json "
                             "nor eos_token in tokenizer_config.json); raymoe separates documents with it")
        bos = ids.get("bos_token_id")
        pad = ids.get("pad_token_id")
        return cls(tok, int(eos), named("bos_token") if bos is None else bos, named("pad_token") if pad is None else pad)

    def special_ids(self) -> dict:
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def save(self, path: str | Path) -> None:
        """`tokenizer.json` and the `special_tokens.json` sidecar beside it."""
        import json

        self._tok.save(str(path))
        (Path(path).parent / self.SIDECAR).write_text(json.dumps(self.special_ids(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        import json

        from tokenizers import Tokenizer as HFTok

        ids = json.loads((Path(path).parent / cls.SIDECAR).read_text())
        return cls(HFTok.from_file(str(path)), ids["eos_token_id"], ids["bos_token_id"], ids["pad_token_id"])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a dataset directory was written with (named in its meta.json)."""
    from cluster.data.tokens import (
        read_meta,  # cluster.data does not import this module: no cycle
    )

    root = Path(data_dir)
    if not (root / "meta.json").is_file() and (root / HFTokenizer.SIDECAR).is_file():
        return HFTokenizer.load(root / "tokenizer.json")  # an imported Hugging Face run's tokenizer
    meta = read_meta(data_dir, verify="none")
    if meta.tokenizer == "hf":
        tok = HFTokenizer.load(root / "tokenizer.json")
    elif meta.tokenizer == "byte":
        tok = ByteTokenizer()
    elif meta.tokenizer == "bpe":
        from tokenizers import Tokenizer as RustTokenizer

        from cluster.data import storage

        loc = storage.locate(data_dir).join("tokenizer.json")  # a local path or a URI
        if not loc.is_file():
            raise FileNotFoundError(f"data path '{data_dir}' uses a BPE tokenizer but has no "
                                    "tokenizer.json")
        tok = BPETokenizer(RustTokenizer.from_str(loc.read_text()))
    elif meta.tokenizer == "json":
        tok = JSONTokenizer.from_path(data_dir)
    else:
        raise ValueError(f"data path '{data_dir}': unknown tokenizer {meta.tokenizer!r} in "
                         "meta.json (expected 'byte', 'bpe' or 'json')")
    if (tok.vocab_size, tok.eos_id) != (meta.vocab_size, meta.eos_id):
        raise ValueError(
            f"data path '{data_dir}': tokenizer has vocab_size={tok.vocab_size}, "
            f"eos_id={tok.eos_id} but meta.json says {meta.vocab_size}, {meta.eos_id}")
    return tok


__all__ = ["ByteTokenizer", "BPETokenizer", "EOS_TEXT", "HFTokenizer", "JSONTokenizer", "Tokenizer", "load_tokenizer"]
