"""Parallel corpora, SentencePiece vocabulary and training/evaluation batches.

Every problem with the input data raises ``DataError`` with a one-line
message naming the file (and line where it helps); the command-line scripts
turn it into an exit code.

The token ids PAD, UNK, BOS, EOS (0..3), ``strip_ids`` and ``pad_batch`` are
defined in integer/token_ids.py.  Sources are encoded as pieces + EOS, targets as BOS +
pieces + EOS, so a model feeds ``tgt[:, :-1]`` to the decoder and predicts
``tgt[:, 1:]``.

NumPy and SentencePiece only: importing this module never loads TensorFlow.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from corpus import demo as demo_corpus
from integer import atomic_files, decoding, token_ids

if TYPE_CHECKING:
    from integer.matmul_engine import IntTransformer

LOG = logging.getLogger(__name__)

# Group 1: docid of a <doc> tag; groups 2, 3: id and text of a <seg>.
_TAG_OR_SEG = re.compile(
    r'<doc\b[^>]*?\bdocid\s*=\s*"([^"]*)"'
    r'|<seg\b[^>]*?\bid\s*=\s*"?([^">\s]+)"?[^>]*>(.*?)</seg\s*>',
    re.DOTALL | re.IGNORECASE,
)
_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos|#[0-9]+|#[xX][0-9a-fA-F]+);")
_NAMED_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


class DataError(ValueError):
    """A corpus or vocabulary input is missing, unreadable or malformed."""


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def _read_text(path: str) -> str:
    """Whole file as text (gzip when the name ends in .gz; '-': standard input), as UTF-8."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as error:  # a corrupt .gz body is a zlib.error
        raise DataError(f"{path}: cannot read ({error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None


def _split_lines(text: str) -> list[str]:
    """Split on newlines only (not on other Unicode line breaks); strip each."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def _require_nonempty(lines: list, path: str) -> None:
    if not lines:
        raise DataError(f"{path}: no sentences found (empty corpus)")


def read_lines(path: str) -> list[str]:
    """Plain text, one stripped sentence per line; .gz is decompressed."""
    return _split_lines(_read_text(path))


def read_iwslt_train(path_de: str, path_en: str) -> tuple[list[str], list[str]]:
    """IWSLT ``train.tags.de-en.{de,en}``: every line not starting with '<'."""
    sides = []
    for path in (path_de, path_en):
        lines = [line for line in read_lines(path) if not line.startswith("<")]
        _require_nonempty(lines, path)
        sides.append(lines)
    if len(sides[0]) != len(sides[1]):
        raise DataError(f"{path_de} has {len(sides[0])} text lines but {path_en} has "
                        f"{len(sides[1])}; the files must be line-aligned")
    return sides[0], sides[1]


def _unescape(text: str) -> str:
    """Replace XML character entities (&amp; &lt; &#39; &#x27; ...)."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith(("#x", "#X")):
            return chr(int(name[2:], 16))
        if name.startswith("#"):
            return chr(int(name[1:]))
        return _NAMED_ENTITIES[name]
    return _ENTITY.sub(replace, text)


def read_segments(path: str) -> list[tuple[str, str]]:
    """(``docid:segid`` key, text) for each ``<seg>`` of an IWSLT .xml / WMT .sgm."""
    segments = []
    doc_id = ""
    for match in _TAG_OR_SEG.finditer(_read_text(path)):
        if match.group(1) is not None:
            doc_id = match.group(1)
        else:
            text = _unescape(match.group(3)).strip()
            segments.append((f"{doc_id}:{match.group(2)}", text))
    return segments


def _is_segmented(path: str) -> bool:
    name = path.removesuffix(".gz").lower()
    return name.endswith((".xml", ".sgm"))


def _is_iwslt_train(path: str) -> bool:
    return os.path.basename(path).startswith("train.tags.")


def _read_aligned_segments(src_path: str, tgt_path: str) -> tuple[list[str], list[str]]:
    src, tgt = read_segments(src_path), read_segments(tgt_path)
    for index in range(max(len(src), len(tgt))):
        src_key = src[index][0] if index < len(src) else "nothing"
        tgt_key = tgt[index][0] if index < len(tgt) else "nothing"
        if src_key != tgt_key:
            raise DataError(f"{tgt_path}: segment {index + 1} is {tgt_key!r} (docid:segid) "
                            f"but {src_path} has {src_key!r} there")
    return [text for _, text in src], [text for _, text in tgt]


def read_source(path: str) -> list[str]:
    """The sentences of one side to translate: .xml/.sgm segments, else one per line ('-':
    standard input); none is a DataError."""
    lines = [text for _, text in read_segments(path)] if _is_segmented(path) else read_lines(path)
    _require_nonempty(lines, path)
    return lines


def read_parallel(src_path: str, tgt_path: str) -> tuple[list[str], list[str]]:
    """Aligned source/target sentences from .xml/.sgm segments, train.tags or plain text."""
    if _is_segmented(src_path) != _is_segmented(tgt_path):
        raise DataError(f"{src_path} and {tgt_path}: one is .xml/.sgm and the other is not")
    if _is_iwslt_train(src_path) and _is_iwslt_train(tgt_path):
        return read_iwslt_train(src_path, tgt_path)
    if _is_segmented(src_path):
        src, tgt = _read_aligned_segments(src_path, tgt_path)
    else:
        src, tgt = read_lines(src_path), read_lines(tgt_path)
        if len(src) != len(tgt):
            raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has "
                            f"{len(tgt)}; the files must be line-aligned")
    _require_nonempty(src, src_path)
    return src, tgt


# ---------------------------------------------------------------------------
# IWSLT folder layout and split selection
# ---------------------------------------------------------------------------


def iwslt_sets(folder: str) -> list[str]:
    """The dev/test sets an IWSLT folder holds (German side), e.g. ["dev2010", "tst2010", ...];
    a TEDX set is listed as "TEDX.<name>"."""
    names = set()
    for path in glob.glob(os.path.join(glob.escape(folder), "IWSLT*.TED*.de-en.de.xml")):
        kind, name = os.path.basename(path).split(".")[1:3]
        names.add(name if kind == "TED" else f"{kind}.{name}")
    return sorted(names)


def _iwslt_set_paths(folder: str, set_name: str) -> tuple[str, str]:
    """German and English XML files of a dev/test set such as "tst2013".

    "tst2013" matches IWSLT*.TED.tst2013 (preferred) or IWSLT*.TEDX.tst2013;
    "TEDX.tst2013" asks for the TEDX one explicitly.
    """
    patterns = [f"IWSLT*.{set_name}.de-en.de.xml"] if "." in set_name else [
        f"IWSLT*.TED.{set_name}.de-en.de.xml", f"IWSLT*.TEDX.{set_name}.de-en.de.xml"]
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if len(matches) > 1:
            names = ", ".join(os.path.basename(m) for m in matches)
            raise DataError(f"{folder}: several files match {pattern}: {names}")
        if matches:
            de_path = matches[0]
            en_path = de_path.removesuffix(".de.xml") + ".en.xml"
            if not os.path.isfile(en_path):
                raise DataError(f"{folder}: missing {os.path.basename(en_path)}")
            return de_path, en_path
    there = ", ".join(iwslt_sets(folder)) or "none"
    raise DataError(f"{folder}: missing {patterns[0]} (IWSLT dev/test set {set_name!r}; the folder "
                    f"has: {there})")


def _iwslt_train_paths(folder: str) -> tuple[str, str]:
    paths = tuple(os.path.join(folder, f"train.tags.de-en.{lang}") for lang in ("de", "en"))
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{folder}: missing {os.path.basename(path)}")
    return paths


def iwslt_paths(folder: str, dev_set: str = "tst2013",
                test_set: str = "tst2014") -> dict[str, tuple[str, str]]:
    """(German, English) file paths of "train", "dev" and "test" in an IWSLT folder."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not a folder")
    return {"train": _iwslt_train_paths(folder),
            "dev": _iwslt_set_paths(folder, dev_set),
            "test": _iwslt_set_paths(folder, test_set)}


def _given_pair(src: str | None, tgt: str | None, flag: str) -> tuple[str, str] | None:
    if bool(src) != bool(tgt):
        raise DataError(f"--{flag}_src and --{flag}_tgt must be given together")
    return (src, tgt) if src and tgt else None


def load_splits(data: str, dev_set: str = "tst2013", test_set: str = "tst2014",
                train_src: str | None = None, train_tgt: str | None = None,
                dev_src: str | None = None, dev_tgt: str | None = None,
                test_src: str | None = None, test_tgt: str | None = None,
                demo_dir: str = "data/demo") -> dict[str, tuple[list[str], list[str]]]:
    """Source/target sentences of "train", "dev" and "test".

    - ``data == "demo"``: the embedded demo corpus, written to ``demo_dir``
      on first use, read as an IWSLT folder.
    - ``data`` a folder: IWSLT raw layout (``train.tags.de-en.*`` plus the
      ``dev_set``/``test_set`` XML files).
    - ``train_src``/``train_tgt`` given ("plain mode"): ``data`` is ignored and
      dev and test must be given too (``--dev_src/--dev_tgt``,
      ``--test_src/--test_tgt``), else DataError names the missing flag.
    In folder mode, dev/test files given by path replace the folder's sets.
    Files given by path may be plain text (optionally .gz), .xml or .sgm.
    """
    given = {"train": _given_pair(train_src, train_tgt, "train"),
             "dev": _given_pair(dev_src, dev_tgt, "dev"),
             "test": _given_pair(test_src, test_tgt, "test")}
    folder = None if given["train"] else _data_folder(data, demo_dir)
    set_names = {"dev": dev_set, "test": test_set}
    splits = {}
    for split, paths in given.items():
        if paths is None and folder is None:
            raise DataError(f"no {split} set: --{split}_src and --{split}_tgt are needed "
                            "when --train_src/--train_tgt are given")
        if paths is None:
            paths = (_iwslt_train_paths(folder) if split == "train"
                     else _iwslt_set_paths(folder, set_names[split]))
        splits[split] = read_parallel(*paths)
    return splits


def _data_folder(data: str, demo_dir: str) -> str:
    if data == "demo":
        try:
            return demo_corpus.write_demo_corpus(demo_dir)
        except OSError as error:
            raise DataError(f"{demo_dir}: cannot write the demo corpus ({error})") from None
    if not os.path.isdir(data):
        raise DataError(f"--data {data}: no such folder; scripts/download_iwslt.sh 2016 {data} makes "
                        f"it (README: Train on IWSLT), or --data demo for the embedded corpus")
    return data


# ---------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------


def _spm_settings(vocab_size: int) -> dict:
    return {"model_type": "bpe", "vocab_size": vocab_size, "character_coverage": 1.0,
            "pad_id": token_ids.PAD, "unk_id": token_ids.UNK, "bos_id": token_ids.BOS,
            "eos_id": token_ids.EOS, "hard_vocab_limit": False}


def _corpus_hash(train_src: list[str], train_tgt: list[str]) -> str:
    digest = hashlib.sha256()
    for side in (train_src, train_tgt):
        digest.update(str(len(side)).encode())
        for line in side:
            digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _spm_cache_path(settings: dict, corpus_hash: str, cache_dir: str) -> str:
    key = json.dumps({"settings": settings, "corpus": corpus_hash}, sort_keys=True)
    return os.path.join(cache_dir, f"spm_{hashlib.sha256(key.encode()).hexdigest()[:16]}.model")


def _sentences(train_src: list[str], train_tgt: list[str]) -> Iterator[str]:
    for line in train_src + train_tgt:
        if line:
            yield line


def _train_spm(train_src: list[str], train_tgt: list[str], settings: dict) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(train_src, train_tgt), model_writer=model,
            minloglevel=2, num_threads=os.cpu_count() or 1, **settings)
    except RuntimeError as error:
        raise DataError(f"--vocab_size {settings['vocab_size']}: SentencePiece training "
                        f"failed ({str(error).strip()})") from None
    return model.getvalue()


def load_or_train_spm(train_src: list[str], train_tgt: list[str], vocab_size: int,
                      cache_dir: str) -> spm.SentencePieceProcessor:
    """Joint BPE model of the training split, cached in ``cache_dir``.

    The cache file name hashes the settings and the training text, so a new
    vocab size or corpus trains a new model.  ``hard_vocab_limit`` is off:
    SentencePiece then builds what the corpus can give, and a vocabulary smaller
    than asked is a DataError naming ``--vocab_size`` and the size that fits.
    """
    settings = _spm_settings(vocab_size)
    path = _spm_cache_path(settings, _corpus_hash(train_src, train_tgt), cache_dir)
    if not os.path.isfile(path):
        LOG.info("training SentencePiece BPE (vocab_size %d) -> %s", vocab_size, path)
        atomic_files.write_atomic(path, _train_spm(train_src, train_tgt, settings))
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as error:
        raise DataError(f"{path}: cannot load SentencePiece model ({error})") from None
    if sp.get_piece_size() < vocab_size:
        raise DataError(f"--vocab_size {vocab_size} is larger than the training corpus can give "
                        f"({sp.get_piece_size()} pieces); use --vocab_size {sp.get_piece_size()} "
                        f"or less")
    return sp


def encode_source(sp: spm.SentencePieceProcessor, lines: list[str]) -> list[list[int]]:
    """Piece ids + eos for each line."""
    return [ids + [token_ids.EOS] for ids in sp.encode(lines)]


def encode_target(sp: spm.SentencePieceProcessor, lines: list[str]) -> list[list[int]]:
    """bos + piece ids + eos for each line."""
    return [[token_ids.BOS] + ids + [token_ids.EOS] for ids in sp.encode(lines)]


def decode_ids(sp: spm.SentencePieceProcessor, ids: list[int] | np.ndarray) -> str:
    """Text of an id sequence, stopping at the first EOS, ignoring PAD/BOS."""
    return sp.decode(token_ids.strip_ids(ids))


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def filter_by_length(src_ids: list[list[int]], tgt_ids: list[list[int]], maxlen1: int,
                     maxlen2: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Drop pairs with source (incl. eos) > maxlen1 or target pieces + eos > maxlen2.

    Returns the kept source and target lists and the number of dropped pairs.
    """
    kept_src, kept_tgt = [], []
    for src, tgt in zip(src_ids, tgt_ids, strict=True):
        if len(src) <= maxlen1 and len(tgt) - 1 <= maxlen2:
            kept_src.append(src)
            kept_tgt.append(tgt)
    return kept_src, kept_tgt, len(src_ids) - len(kept_src)


def encode_training_pairs(sp: spm.SentencePieceProcessor, src_lines: list[str], tgt_lines: list[str],
                          maxlen1: int, maxlen2: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Encoded training pairs (source + eos, bos + target + eos) within maxlen, and how many
    were dropped for being longer."""
    return filter_by_length(encode_source(sp, src_lines), encode_target(sp, tgt_lines),
                            maxlen1, maxlen2)


def _budget_chunks(sorted_lengths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """(start, end) ranges over ascending lengths with count * longest <= budget."""
    chunks, start = [], 0
    for end, length in enumerate(sorted_lengths.tolist()):
        if end > start and (end - start + 1) * length > batch_tokens:
            chunks.append((start, end))
            start = end
    chunks.append((start, len(sorted_lengths)))
    return chunks


def _pair_lengths(src_ids: list[list[int]], tgt_ids: list[list[int]]) -> np.ndarray:
    pairs = zip(src_ids, tgt_ids, strict=True)
    return np.array([max(len(s), len(t)) for s, t in pairs], np.int64)


def train_batches(src_ids: list[list[int]], tgt_ids: list[list[int]], batch_tokens: int,
                  seed: int, epoch: int, shuffle: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Padded (src, tgt) int32 batches of similar length for one epoch.

    Each batch holds at least one pair and otherwise B * max(Ls, Lt) <=
    batch_tokens.  With ``shuffle``, pairs of equal length and the batch order
    are shuffled by (seed, epoch); the batch sizes are the same every epoch.
    """
    if not src_ids:
        return []
    lengths = _pair_lengths(src_ids, tgt_ids)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = []
    for start, end in _budget_chunks(lengths[order], batch_tokens):
        members = order[start:end].tolist()
        batches.append((token_ids.pad_batch([src_ids[i] for i in members]),
                        token_ids.pad_batch([tgt_ids[i] for i in members])))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(src_ids: list[list[int]], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original indices, padded int32 sources) batches sorted by length.

    No sentence is dropped, however long; put outputs back in order with the
    indices.
    """
    order = np.argsort([len(s) for s in src_ids], kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batches.append((indices, token_ids.pad_batch([src_ids[i] for i in indices])))
    return batches


def translate_lines(engine: IntTransformer, sp, lines: list[str], batch_size: int,
                    beam: int = 1, alpha: float = 0.6) -> list[str]:
    """Detokenized translations of `lines` in order by an integer engine (batched as the TF model's:
    the same sources and batches), greedy or beam search."""
    hyps = [""] * len(lines)
    for index, src in eval_batches(encode_source(sp, lines), batch_size):
        out = decoding.greedy(engine, src) if beam == 1 else decoding.beam_search(engine, src, beam, alpha)
        for i, row in zip(index, out):
            hyps[i] = decode_ids(sp, row)
    return hyps
