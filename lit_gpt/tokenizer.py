"""One tokenizer interface over SentencePiece models and Hugging Face `tokenizer.json` files.

`Tokenizer(path)` accepts a directory (with `tokenizer.model`, preferred, or `tokenizer.json`), a `.model` file or
a `tokenizer.json` file. BOS/EOS are never implicit: `encode(text, bos=None, eos=False)` adds BOS when `bos` is
True, or, with `bos=None`, when the tokenizer's own policy says so (`add_bos_token` in `tokenizer_config.json`;
SentencePiece models default to BOS like Llama/LLäMmlein). Special-token strings inside the text (e.g. an HTML
`<s>` tag) are always encoded as plain text, never as control tokens, with both backends.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence


class Tokenizer:
    def __init__(self, path) -> None:
        self.path = Path(path)
        config: dict = {}
        if self.path.is_dir():
            config = _read_config(self.path)
            if (self.path / "tokenizer.model").is_file():
                self._init_sentencepiece(self.path / "tokenizer.model", config)
            elif (self.path / "tokenizer.json").is_file():
                self._init_hf(self.path / "tokenizer.json", config)
            else:
                raise ValueError(f"{self.path}: directory holds neither tokenizer.model nor tokenizer.json")
        elif self.path.is_file() and self.path.suffix == ".model":
            self._init_sentencepiece(self.path, config)
        elif self.path.is_file() and self.path.suffix == ".json":
            self._init_hf(self.path, _read_config(self.path.parent))
        elif self.path.exists():
            raise ValueError(f"{self.path}: not a tokenizer (expected a directory, a .model or a tokenizer.json file)")
        else:
            raise ValueError(f"{self.path}: tokenizer path does not exist")

    # ------------------------------------------------------------------ backends
    def _init_sentencepiece(self, model_file: Path, config: dict) -> None:
        import sentencepiece as spm

        self.backend = "sentencepiece"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromFile(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = _optional_id(sp.bos_id())
        self.eos_id = _optional_id(sp.eos_id())
        self.unk_id = _optional_id(sp.unk_id())
        self.pad_id = _optional_id(sp.pad_id())
        self.default_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None

    def _init_hf(self, json_file: Path, config: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.backend = "tokenizers"
        try:
            self._hf = HFTokenizer.from_file(str(json_file))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise ValueError(f"{json_file}: not a Hugging Face tokenizer file ({e})") from None
        self._hf.encode_special_tokens = True  # text is text: "<s>" in a document is not BOS
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        special_map = _read_json(json_file.parent / "special_tokens_map.json")

        def token_id(name: str) -> Optional[int]:
            token = config.get(name, special_map.get(name))
            if isinstance(token, dict):
                token = token.get("content")
            return vocab.get(token) if isinstance(token, str) else None

        def conventional(*names: str) -> Optional[int]:  # for a bare tokenizer.json without config files
            return next((vocab[n] for n in names if n in vocab), None)

        bos, eos = token_id("bos_token"), token_id("eos_token")
        self.bos_id = bos if bos is not None else conventional("<s>", "<|begin_of_text|>", "<bos>")
        self.eos_id = eos if eos is not None else conventional("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
        self.unk_id, self.pad_id = token_id("unk_token"), token_id("pad_token")
        if "add_bos_token" in config:
            self.default_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        else:  # no config: follow the file's own post-processor
            ids = self._hf.encode("", add_special_tokens=True).ids
            self.default_bos = self.bos_id is not None and ids[:1] == [self.bos_id]

    # ------------------------------------------------------------------ API
    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: Optional[bool] = None, eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text; SentencePiece uses `num_threads` threads."""
        add_bos = self.default_bos if bos is None else bos
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.path}: tokenizer has no BOS token")
        if eos and self.eos_id is None:
            raise ValueError(f"{self.path}: tokenizer has no EOS token")
        texts = list(texts)
        if self.backend == "sentencepiece":
            return self._sp.encode(texts, add_bos=add_bos, add_eos=eos, num_threads=num_threads, out_type=int)
        prefix, suffix = ([self.bos_id] if add_bos else []), ([self.eos_id] if eos else [])
        return [prefix + e.ids + suffix for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad and other control tokens decode to nothing."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.backend == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, default_bos={self.default_bos})")


def _optional_id(value: int) -> Optional[int]:
    return value if value >= 0 else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_config(directory: Path) -> dict:
    return _read_json(directory / "tokenizer_config.json")
