"""Train a SentencePiece BPE tokenizer and write it as `tokenizer.model` plus Hugging Face files.

    python scripts/train_tokenizer.py --input corpus/ --output_dir tokenizer --vocab_size 32000

Inputs: .txt, .jsonl, .jsonl.zst, .parquet files or folders of them. Training sees each non-empty line of each
document as one sentence (SentencePiece's unit), so newlines are encoded through byte fallback like Llama's.
The model follows the Llama/LLäMmlein recipe: BPE, ids <unk>=0 <s>=1 </s>=2, no pad, identity normalization
(text round-trips exactly: runs of spaces, newlines, umlauts, ß), split digits, byte fallback. `--special_tokens`
become SentencePiece control symbols: reserved ids that no text ever encodes to.

Outputs in --output_dir: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` (loadable with
`AutoTokenizer.from_pretrained(dir)`, no remote code) and `tokenizer.model`, written last so that its presence
means the directory is complete, then `provenance.json` (sha256 of each file, the encoding backend).
Before writing, AutoTokenizer loaded from exactly these files is compared with SentencePiece on training documents
and edge cases; while the directory holds exactly the recorded files, `Tokenizer` encodes it with SentencePiece.
The Hugging Face files reproduce SentencePiece exactly: the leading space is a `Prepend("▁")` normalizer (a
Metaspace pre-tokenizer would drop it before text that starts with a space), and special-token strings in text
stay text (`split_special_tokens`), as in SentencePiece. BOS policy: BOS added, EOS not (as LLäMmlein).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.corpus import ErrorPolicy, InputError, expand_inputs, iter_documents

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
EDGE_CASES = [
    "", " ", "  ", " leading space", "  two leading spaces", "trailing  ", "a    b\t\tc", "\nstart\n\nend\n",
    "Grüße aus Köln: Straße, Maß, Äpfel, Öl, Übermut. ẞ", "1234567 3,14 2024-01-01", "Emoji 😀🦙 done",
    "<s>HTML strike</s> <unk> <|tag|>", "▁already▁marked", "Tab\tand\r\nCRLF", "ﬁ １２３ Ǆ",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or folders (.txt/.jsonl/.jsonl.zst/.parquet)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--vocab_size", type=int, required=True, help="total size incl. <unk>/<s>/</s>, bytes, specials")
    p.add_argument("--byte_fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode characters outside the vocabulary as UTF-8 bytes instead of <unk> (default: on)")
    p.add_argument("--special_tokens", nargs="*", default=[], help="extra reserved tokens, e.g. '<|im_start|>'")
    p.add_argument("--character_coverage", type=float, default=0.9995,
                   help="share of characters covered by the vocabulary; rarer ones use byte fallback")
    p.add_argument("--input_sentence_size", type=int, default=10_000_000,
                   help="train on at most this many lines, sampled uniformly (0: all)")
    p.add_argument("--max_sentence_length", type=int, default=16384, help="longer lines (bytes) are skipped")
    p.add_argument("--text_field", default="text", help="JSON/parquet field holding the text")
    p.add_argument("--on_error", default="stop", choices=["skip", "stop"], help="on malformed records")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --output_dir")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    reserved = 3 + len(args.special_tokens) + (256 if args.byte_fallback else 0)
    if args.vocab_size <= reserved:
        raise InputError(f"--vocab_size {args.vocab_size}: must exceed the {reserved} reserved ids "
                         f"(<unk>/<s>/</s>, special tokens{', 256 bytes' if args.byte_fallback else ''})")
    if not 0 < args.character_coverage <= 1:
        raise InputError(f"--character_coverage {args.character_coverage}: must be in (0, 1]")
    for token in args.special_tokens:
        if not token or any(c.isspace() for c in token) or token in (UNK, BOS, EOS):
            raise InputError(f"--special_tokens {token!r}: must be non-empty, without whitespace, not <unk>/<s>/</s>")
    if len(set(args.special_tokens)) != len(args.special_tokens):
        raise InputError("--special_tokens: duplicates")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"--output_dir {args.output_dir}: exists and is not a directory")
    if (args.output_dir / "tokenizer.model").exists() and not args.overwrite:
        raise InputError(f"--output_dir {args.output_dir}: already holds a tokenizer (pass --overwrite to replace it)")


def train_sentencepiece(args: argparse.Namespace, files: list[Path], samples: list[str]) -> bytes:
    """The serialized model; `samples` collects the first documents for the consistency check."""
    import sentencepiece as spm

    policy = ErrorPolicy(args.on_error)
    count = [0]

    def sentences():
        for _, text in iter_documents(files, policy, text_field=args.text_field):
            if len(samples) < 2000:
                samples.append(text)
            for line in text.split("\n"):
                if line.strip():
                    count[0] += 1
                    yield line

    spm.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="bpe", vocab_size=args.vocab_size,
            character_coverage=args.character_coverage, byte_fallback=args.byte_fallback, split_digits=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=UNK, bos_piece=BOS,
            eos_piece=EOS, control_symbols=args.special_tokens or "", input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True, max_sentence_length=args.max_sentence_length,
            num_threads=max(1, args.num_threads), minloglevel=2)
    except RuntimeError as e:
        if count[0] == 0:
            raise InputError(f"--input: no text found in {len(files)} file(s)") from None
        if "required_chars" in str(e):  # SentencePiece's words: "Vocabulary size is smaller than required_chars"
            raise InputError(f"--vocab_size {args.vocab_size}: too small for the characters of this corpus; raise it "
                             f"or lower --character_coverage ({e})") from None
        if "Vocabulary size" in str(e):
            raise InputError(f"--vocab_size {args.vocab_size}: too large for this corpus ({e})") from None
        raise
    if policy.count:
        print(f"skipped {policy.count} malformed record(s)", file=sys.stderr)
    print(f"trained on {count[0]:,} lines from {len(files)} file(s)")
    return model.getvalue()


def hf_tokenizer_files(model: bytes, special_tokens: list[str], add_bos: bool = True,
                       add_eos: bool = False) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json equivalent to the SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    specials = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    normal = {piece: i for i, piece in enumerate(pieces)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    # BPE merges: every split of a piece into two pieces, ranked by the merged piece's id (SentencePiece's score order).
    merges = sorted((pid, normal[piece[:k]], normal[piece[k:]], piece[:k], piece[k:])
                    for piece, pid in normal.items() for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=UNK, fuse_unk=True,
                               byte_fallback=sp.is_byte(sp.piece_to_id("<0x41>"))))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in specials])
    template = " ".join(([f"{BOS}:0"] if add_bos else []) + ["$A:0"] + ([f"{EOS}:0"] if add_eos else []))
    pair = template + " " + " ".join(([f"{BOS}:1"] if add_bos else []) + ["$B:1"] + ([f"{EOS}:1"] if add_eos else []))
    tok.post_processor = processors.TemplateProcessing(single=template, pair=pair,
                                                       special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    if special_tokens:
        special_map["additional_special_tokens"] = list(special_tokens)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map, "pad_token": None,
              "add_bos_token": add_bos, "add_eos_token": add_eos, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str(pretty=False),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"}


def check_equivalence(model: bytes, hf_files: dict[str, str], texts: list[str]) -> None:
    """Raise when AutoTokenizer, loaded from exactly these files, encodes or decodes any text differently from
    SentencePiece (with and without its own BOS/EOS policy). This is what lets `Tokenizer` encode the published
    directory with SentencePiece (see provenance.json)."""
    import tempfile

    import sentencepiece as spm

    from lit_gpt.tokenizer import load_auto_tokenizer

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    with tempfile.TemporaryDirectory(prefix="tokenizer-check-") as scratch:
        for name, content in {**hf_files, "tokenizer.model": model}.items():
            (Path(scratch) / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        auto = load_auto_tokenizer(Path(scratch))
    config = json.loads(hf_files["tokenizer_config.json"])
    prefix = [sp.bos_id()] if config["add_bos_token"] else []
    suffix = [sp.eos_id()] if config["add_eos_token"] else []
    plain = auto(texts, add_special_tokens=False)["input_ids"]
    with_policy = auto(texts)["input_ids"]
    for text, ids, auto_ids, auto_policy_ids in zip(texts, sp.encode(texts), plain, with_policy, strict=True):
        # <unk> (only without byte fallback) decodes to " ⁇ " in SentencePiece and to nothing in Hugging Face, by
        # each library's convention; the ids agree, and the text behind <unk> is lost either way.
        if (ids != auto_ids or auto_policy_ids != prefix + ids + suffix
                or (sp.unk_id() not in ids and auto.decode(ids, skip_special_tokens=True) != sp.decode(ids))):
            raise RuntimeError(f"AutoTokenizer on the converted files differs from SentencePiece on {text[:80]!r}: "
                               f"{ids[:12]} vs {auto_ids[:12]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validate(args)
        files = expand_inputs(args.input)
        samples: list[str] = []
        model = train_sentencepiece(args, files, samples)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hf_files = hf_tokenizer_files(model, args.special_tokens)
    check_equivalence(model, hf_files, EDGE_CASES + args.special_tokens + samples)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # With --overwrite the old model goes first: its presence means "complete", and an interrupted write must not
    # leave it beside the new Hugging Face files (prepare_data.py would read the old model).
    (args.output_dir / "tokenizer.model").unlink(missing_ok=True)
    (args.output_dir / "provenance.json").unlink(missing_ok=True)
    for name, content in hf_files.items():
        write_atomically(args.output_dir / name, content.encode("utf-8"))
    write_atomically(args.output_dir / "tokenizer.model", model)
    write_provenance(args, files)
    print(f"wrote {args.output_dir}/tokenizer.model and Hugging Face files ({args.vocab_size} tokens)")
    return 0


def write_provenance(args: argparse.Namespace, files: list[Path]) -> None:
    """provenance.json: each tokenizer file's sha256 and the backend `Tokenizer(output_dir)` encodes with (the
    same record prepare_data.py puts in its manifests; the name keeps it out of the hashed tokenizer files)."""
    from lit_gpt.tokenizer import (
        PROVEN_AGAINST,
        PROVEN_ATTRIBUTES,
        PROVENANCE_FILE,
        Tokenizer,
        tokenizer_digests,
    )

    tokenizer = Tokenizer(args.output_dir)  # through AutoTokenizer: provenance.json is not there yet
    provenance = {"backend": tokenizer.backend, "vocab_size": args.vocab_size, "proven_against": PROVEN_AGAINST,
                  "attributes": {name: getattr(tokenizer, name) for name in PROVEN_ATTRIBUTES},
                  "files_sha256": tokenizer_digests(args.output_dir),
                  "trained_on": [str(p) for p in files]}
    write_atomically(args.output_dir / PROVENANCE_FILE, json.dumps(provenance, indent=1).encode("utf-8"))


if __name__ == "__main__":
    sys.exit(main())
