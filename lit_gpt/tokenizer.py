r"""One tokenizer interface over Hugging Face tokenizer directories and SentencePiece models.

Which ids a text gets depends on which files are read and how, so the choice follows the tools that trained the
models this toolkit continues:

- a directory with `tokenizer.json` (or a path to that file): exactly what `transformers.AutoTokenizer` builds for
  the directory (backend "transformers"), as LLäMmlein's code and every Hugging Face user encode. AutoTokenizer may
  rebuild parts of the file's pipeline from `tokenizer_config.json` (LLäMmlein's `add_prefix_space: false` replaces
  the file's pre-tokenizer; its added tokens tab, newline, `$ < \ ^ { } ~` and the backtick come in as well), so
  the pipeline is taken from AutoTokenizer itself rather than re-derived here;
- a directory with only `tokenizer.model`, or a path to a `.model` file: SentencePiece (backend "sentencepiece"), as
  TinyLlama's code encoded. Pass the `.model` file to encode a directory that holds both files this way;
- any other `.json` file: that `tokenizers` file as written (backend "tokenizers").

BOS/EOS are never implicit: `encode(text, bos=None, eos=False)` adds BOS when `bos` is True, or, with `bos=None`,
when the tokenizer's own policy says so (what `AutoTokenizer(text)` does: BOS for LLäMmlein and Llama, from the
post-processor; `add_bos_token` in `tokenizer_config.json` for SentencePiece, default True). EOS is added only on
request. Special-token strings inside the text (e.g. an HTML `<s>` tag) are always encoded as plain text, never as
control tokens, with every backend (AutoTokenizer's `split_special_tokens=True`); added tokens that are not special
(LLäMmlein's newline) are matched as AutoTokenizer matches them.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

# The one sha256 helper, under the name the tokenizer provenance and data manifests have always imported it by
from lit_gpt.checkpoint.verify import sha256_file

# Files `AutoTokenizer.from_pretrained(dir)` reads for a tokenizer.json directory.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# What AutoTokenizer makes of a directory's files, recorded in provenance.json by scripts/train_tokenizer.py.
PROVEN_ATTRIBUTES = ("vocab_size", "bos_id", "eos_id", "unk_id", "pad_id", "default_bos")
PROVENANCE_FILE = "provenance.json"
# provenance.json's "proven_against": what SentencePiece's ids were compared with before the files were written.
# Records without it (earlier versions compared with the bare `tokenizers` object) prove nothing about AutoTokenizer.
PROVEN_AGAINST = "transformers.AutoTokenizer"


class Tokenizer:
    backend: str  # whose ids: "transformers" (AutoTokenizer's), "sentencepiece" or "tokenizers"
    files: list[Path]  # the files that decide the ids (see `describe`)

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._hf_directory = None  # set while a proven directory's AutoTokenizer is not loaded yet
        if self.path.is_dir():
            if (self.path / "tokenizer.json").is_file():
                self._init_hf_directory(self.path)
            elif (self.path / "tokenizer.model").is_file():
                self._init_sentencepiece(self.path / "tokenizer.model")
            else:
                raise ValueError(f"{self.path}: directory holds neither tokenizer.json nor tokenizer.model")
        elif self.path.is_file() and self.path.suffix == ".model":
            self._init_sentencepiece(self.path)
        elif self.path.is_file() and self.path.name == "tokenizer.json":
            self._init_hf_directory(self.path.parent)
        elif self.path.is_file() and self.path.suffix == ".json":
            self._init_tokenizers(self.path)
        elif self.path.exists():
            raise ValueError(f"{self.path}: not a tokenizer (expected a directory, a .model or a tokenizer.json file)")
        else:
            raise ValueError(f"{self.path}: tokenizer path does not exist")

    # ------------------------------------------------------------------ backends
    def _init_hf_directory(self, directory: Path) -> None:
        if not self._init_proven(directory):
            self._init_transformers(directory)

    def _init_transformers(self, directory: Path) -> None:
        self.backend = "transformers"
        self.files = _hf_files(directory)
        auto = self._auto = load_auto_tokenizer(directory)
        ids = (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id, auto.pad_token_id)
        self._init_hf(auto.backend_tokenizer, *ids)
        self._sp = None

    def _init_proven(self, directory: Path) -> bool:
        """A train_tokenizer directory whose files are unchanged: AutoTokenizer's attributes as recorded at training
        time and SentencePiece to encode, without importing transformers (seconds per data-preparation run)."""
        proven = _proven_sentencepiece(directory)
        if proven is None:
            return False
        self._sp, recorded = proven
        self.backend, self.files, self._auto, self._hf_directory = "transformers", _hf_files(directory), None, directory
        for name in PROVEN_ATTRIBUTES:
            setattr(self, name, recorded[name])
        return True

    def _init_tokenizers(self, json_file: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.backend = "tokenizers"
        self.files = [json_file]
        try:
            backend = HFTokenizer.from_file(str(json_file))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise ValueError(f"{json_file}: not a Hugging Face tokenizer file ({e})") from None
        self._auto = None
        self._init_hf(backend, None, None, None, None)
        self._sp = None

    def _init_hf(self, backend, bos: int | None, eos: int | None, unk: int | None, pad: int | None) -> None:
        self._hf = backend
        self._hf.encode_special_tokens = True  # text is text: "<s>" in a document is not BOS
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1

        def conventional(*names: str) -> int | None:  # for a bare tokenizer.json without config files
            return next((vocab[n] for n in names if n in vocab), None)

        self.bos_id = bos if bos is not None else conventional("<s>", "<|begin_of_text|>", "<bos>")
        self.eos_id = eos if eos is not None else conventional("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
        model_unk = getattr(backend.model, "unk_token", None)
        self.unk_id = unk if unk is not None else conventional(*([model_unk] if model_unk else []), "<unk>")
        self.pad_id = pad
        # The post-processor is the policy: it is what AutoTokenizer(text) applies (built from add_bos_token).
        ids = backend.encode("", add_special_tokens=True).ids
        self.default_bos = self.bos_id is not None and ids[:1] == [self.bos_id]

    def _init_sentencepiece(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.backend = "sentencepiece"
        config_file = model_file.parent / "tokenizer_config.json"
        self.files = [model_file] + ([config_file] if config_file.is_file() else [])
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
        add_bos = _read_json(config_file).get("add_bos_token", True)
        self.default_bos = bool(add_bos) and self.bos_id is not None

    # ------------------------------------------------------------------ API
    @property
    def encoder(self) -> str:
        """The library that turns text into ids: "sentencepiece" (also for a proven tokenizer.json directory, whose
        ids are AutoTokenizer's), "transformers" (AutoTokenizer's backend) or "tokenizers"."""
        return "sentencepiece" if self._sp is not None else self.backend

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool | None = None, eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text, encoded with `num_threads` threads."""
        add_bos = self.default_bos if bos is None else bos
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.path}: tokenizer has no BOS token")
        if eos and self.eos_id is None:
            raise ValueError(f"{self.path}: tokenizer has no EOS token")
        texts = list(texts)
        prefix, suffix = ([self.bos_id] if add_bos else []), ([self.eos_id] if eos else [])
        if self._sp is not None:  # the SentencePiece backend, or a tokenizer.json proven to give its ids
            sp = self._sp
            if (not prefix or sp.bos_id() == self.bos_id) and (not suffix or sp.eos_id() == self.eos_id):
                # SentencePiece adds them itself, saving a Python list copy per document
                return sp.encode(texts, num_threads=num_threads, out_type=int, add_bos=bool(prefix),
                                 add_eos=bool(suffix))
            ids = sp.encode(texts, num_threads=num_threads, out_type=int)
        elif num_threads > 1:  # tokenizers' own thread pool (all cores)
            ids = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        else:  # e.g. one of several data-preparation processes: no thread pool of its own
            ids = [self._hf.encode(text, add_special_tokens=False).ids for text in texts]
        return [prefix + i + suffix for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad and other control tokens decode to nothing."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.backend == "sentencepiece":
            return self._sp.decode(ids)
        if self._hf_directory is not None:  # a proven directory: AutoTokenizer decodes, loaded when first needed
            self._auto, self._hf_directory = load_auto_tokenizer(self._hf_directory), None
        if self._auto is not None:  # AutoTokenizer's own decode: it may clean up spaces after the backend
            return self._auto.decode(ids, skip_special_tokens=True)
        return self._hf.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict:
        """What decides the ids, for manifests: backend, the files read (name -> sha256) and the BOS/EOS policy.

        Paths are left out (the same tokenizer copied elsewhere describes the same), as are library versions."""
        return {"backend": self.backend,
                "files": {f.name: sha256_file(f) for f in self.files},
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "add_bos": self.default_bos}

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, backend={self.backend}, encoder={self.encoder}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, default_bos={self.default_bos})")


def _optional_id(value: int) -> int | None:
    return value if value >= 0 else None


def tokenizer_files(path: Path) -> list[Path]:
    """The files that make a tokenizer (hashed into data manifests): the file itself, or a directory's tokenizer
    files (what any backend may read, so a manifest and the trainer compare the same set)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(("tokenizer", "special_tokens")))


def tokenizer_digests(path: Path) -> dict[str, str]:
    """{file name: sha256} of `tokenizer_files(path)`: what manifests and provenance.json record and compare."""
    return {p.name: sha256_file(p) for p in tokenizer_files(path)}


def load_auto_tokenizer(directory: Path):
    """transformers.AutoTokenizer for the directory (a fast one), with one error naming what it cannot use."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    for name in ("config.json", *HF_TOKENIZER_FILES[1:]):  # what AutoTokenizer reads besides tokenizer.json:
        _read_json(directory / name)  # a damaged one is named here, not deep inside transformers
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on legacy behaviour are not ours to print
    try:
        auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for files it cannot use
        raise ValueError(f"{directory}: transformers.AutoTokenizer cannot load this tokenizer "
                         f"({type(e).__name__}: {str(e).strip()[:300]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(auto, "is_fast", False):
        raise ValueError(f"{directory}: AutoTokenizer gives a {type(auto).__name__}, which has no tokenizers "
                         "backend to encode with")
    return auto


def _hf_files(directory: Path) -> list[Path]:
    return [directory / name for name in HF_TOKENIZER_FILES if (directory / name).is_file()]


def _proven_sentencepiece(directory: Path):
    """(SentencePiece encoder, AutoTokenizer's recorded attributes) for a tokenizer.json directory whose ids it is
    known to give, else None.

    scripts/train_tokenizer.py converts its SentencePiece model to the Hugging Face files, proves before writing
    them that AutoTokenizer loaded from exactly those files encodes and decodes like SentencePiece, and records
    every file's sha256 in provenance.json. SentencePiece gives AutoTokenizer's ids at about twice the speed of the
    `tokenizers` BPE (what data preparation spends its time on) only while the directory holds exactly the recorded
    files, byte for byte: AutoTokenizer reads more files than we could name (added_tokens.json, chat templates,
    config.json, ...), so any added or deleted file (tokenizer_config.json, say) falls back to AutoTokenizer.
    Decoding stays AutoTokenizer's."""
    try:
        provenance = json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))
        recorded, attributes = provenance["files_sha256"], provenance["attributes"]
        proven_against = provenance["proven_against"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if proven_against != PROVEN_AGAINST or not isinstance(recorded, dict) or not isinstance(attributes, dict):
        return None
    if set(attributes) != set(PROVEN_ATTRIBUTES) or "tokenizer.model" not in recorded:
        return None
    entries = {entry.name: entry for entry in directory.iterdir() if entry.name != PROVENANCE_FILE}
    if set(entries) != set(recorded) or not all(entry.is_file() and sha256_file(entry) == recorded[name]
                                                for name, entry in entries.items()):
        return None
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")), attributes
    except (OSError, RuntimeError):
        return None


def _read_json(path: Path) -> dict:
    """The JSON object in `path` ({} when there is no such file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data
