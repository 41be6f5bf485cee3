"""Tests of data_load.py (readers, SentencePiece, batching) and corpus/demo.py."""

import gzip
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import data_load
from corpus import demo as demo_corpus
from data_load import DataError
from integer import token_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# Fixture files
# ---------------------------------------------------------------------------


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def xml_file(path, segments: list[tuple[str, str]], lang: str = "de") -> str:
    """IWSLT-style XML with (seg id, already escaped text) in one talk."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>",
             f'<srcset setid="iwslt2016-tst2013" srclang="{lang}">',
             '<doc docid="535" genre="lectures">', "<url>http://x/talk</url>",
             "<talkid>535</talkid>", "<title>A talk &amp; more</title>"]
    lines += [f'<seg id="{seg_id}"> {text} </seg>' for seg_id, text in segments]
    lines += ["</doc>", "</srcset>", "</mteval>"]
    return write(path, "\n".join(lines) + "\n")


TRAIN_DE = """<url>http://www.ted.com/talks/x</url>
 <keywords>talks, science</keywords>
  <talkid>1</talkid>
 Vielen Dank, Chris.
Es ist mir eine Ehre.
<title>Zwei</title>
   Noch ein Satz.
"""
TRAIN_EN = """<url>http://www.ted.com/talks/x</url>
<keywords>talks, science</keywords>
<talkid>1</talkid>
Thank you so much, Chris.
 It's an honor.
<title>Two</title>
One more sentence.
"""


@pytest.fixture
def iwslt_folder(tmp_path):
    write(tmp_path / "train.tags.de-en.de", TRAIN_DE)
    write(tmp_path / "train.tags.de-en.en", TRAIN_EN)
    for set_name in ("tst2013", "tst2014"):
        xml_file(tmp_path / f"IWSLT16.TED.{set_name}.de-en.de.xml",
                 [("1", "Er sagte: &quot;Hallo&quot; &amp; ging."), ("2", "Das ist &#39;gut&#39;.")])
        xml_file(tmp_path / f"IWSLT16.TED.{set_name}.de-en.en.xml",
                 [("1", "He said: &quot;Hello&quot; &amp; left."), ("2", "That&apos;s &lt;good&gt;.")], "en")
    return str(tmp_path)


# ---------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------


def test_imports_load_no_tensorflow_and_parse_no_lexicon():
    """`import data_load` (and with it corpus.demo) in a fresh interpreter loads no TensorFlow,
    and importing the demo grammar parses no lexicon table until the generator needs one."""
    code = ("import sys\n"
            "import corpus.demo\n"
            "assert corpus.demo.lexicon.cache_info().currsize == 0, 'corpus.demo parsed its lexicon'\n"
            "import data_load\n"
            "tf = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
            "assert not tf, f'data_load loaded {tf[:3]}'\n"
            "assert corpus.demo.lexicon.cache_info().currsize == 0, 'data_load parsed the lexicon'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert demo_corpus.lexicon() is demo_corpus.lexicon()  # parsed once, then cached


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def test_iwslt_folder_skips_tags_and_unescapes(iwslt_folder):
    splits = data_load.load_splits(iwslt_folder)
    assert splits["train"] == (["Vielen Dank, Chris.", "Es ist mir eine Ehre.", "Noch ein Satz."],
                               ["Thank you so much, Chris.", "It's an honor.", "One more sentence."])
    assert splits["dev"] == (['Er sagte: "Hallo" & ging.', "Das ist 'gut'."],
                             ['He said: "Hello" & left.', "That's <good>."])
    assert splits["test"] == splits["dev"]


def test_iwslt_paths_accepts_other_years_and_tedx(tmp_path):
    write(tmp_path / "train.tags.de-en.de", "a\n")
    write(tmp_path / "train.tags.de-en.en", "a\n")
    for name in ("IWSLT17.TED.tst2013", "IWSLT14.TEDX.dev2012"):
        for lang in ("de", "en"):
            xml_file(tmp_path / f"{name}.de-en.{lang}.xml", [("1", "x")])
    paths = data_load.iwslt_paths(str(tmp_path), "tst2013", "dev2012")
    assert paths["dev"][0].endswith("IWSLT17.TED.tst2013.de-en.de.xml")
    assert paths["test"][1].endswith("IWSLT14.TEDX.dev2012.de-en.en.xml")
    assert data_load.iwslt_sets(str(tmp_path)) == ["TEDX.dev2012", "tst2013"]
    with pytest.raises(DataError, match=r"missing IWSLT\*\.TED\.tst2014\.de-en\.de\.xml .*the folder "
                                        r"has: TEDX\.dev2012, tst2013\)"):
        data_load.iwslt_paths(str(tmp_path), "tst2013", "tst2014")


def test_train_tags_line_count_mismatch_names_files(tmp_path):
    de = write(tmp_path / "train.tags.de-en.de", "<url>u</url>\neins\nzwei\n")
    en = write(tmp_path / "train.tags.de-en.en", "<url>u</url>\none\n")
    with pytest.raises(DataError, match=r"train\.tags\.de-en\.de has 2 .*train\.tags\.de-en\.en has 1"):
        data_load.read_iwslt_train(de, en)


def test_plain_line_count_mismatch(tmp_path):
    src, tgt = write(tmp_path / "a.de", "x\ny\n"), write(tmp_path / "a.en", "x\n")
    with pytest.raises(DataError, match=r"a\.de has 2 lines but .*a\.en has 1"):
        data_load.read_parallel(src, tgt)


def test_xml_segment_id_mismatch(tmp_path):
    src = xml_file(tmp_path / "s.de.xml", [("1", "a"), ("2", "b"), ("3", "c")])
    tgt = xml_file(tmp_path / "s.en.xml", [("1", "a"), ("3", "c")])
    with pytest.raises(DataError, match=r"s\.en\.xml: segment 2 is '535:3'.*'535:2'"):
        data_load.read_parallel(src, tgt)


def test_sgm_segments(tmp_path):
    body = ('<refset setid="newstest2014" srclang="any">\n<doc sysid="ref" docid="d1" genre="news">\n'
            '<seg id="1">Erster Satz &amp; mehr.</seg>\n<seg id=2>Zweiter.</seg>\n</doc>\n'
            '<doc sysid="ref" docid="d2">\n<seg id="1">Dritter.</seg>\n</doc>\n</refset>\n')
    path = write(tmp_path / "news.de.sgm", body)
    assert data_load.read_segments(path) == [("d1:1", "Erster Satz & mehr."), ("d1:2", "Zweiter."),
                                             ("d2:1", "Dritter.")]


def test_plain_gz_and_unicode_line_separators(tmp_path):
    for name, text in (("t.de.gz", " Grüße\u2028 zwei\nzwei \n"), ("t.en.gz", "greetings\ntwo\n")):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(text)
    src, tgt = data_load.read_parallel(str(tmp_path / "t.de.gz"), str(tmp_path / "t.en.gz"))
    assert src == ["Grüße\u2028 zwei", "zwei"] and tgt == ["greetings", "two"]


def test_empty_corpus(tmp_path):
    src, tgt = write(tmp_path / "e.de", ""), write(tmp_path / "e.en", "")
    with pytest.raises(DataError, match=r"e\.de: no sentences"):
        data_load.read_parallel(src, tgt)
    only_tags = write(tmp_path / "train.tags.de-en.de", "<url>u</url>\n")
    with pytest.raises(DataError, match="no sentences"):
        data_load.read_iwslt_train(only_tags, only_tags)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.de: file not found"):
        data_load.read_lines(str(tmp_path / "nope.de"))
    bad = tmp_path / "bad.de"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.de:2: not valid UTF-8"):
        data_load.read_lines(str(bad))
    with pytest.raises(DataError, match="missing train.tags.de-en.de"):
        data_load.load_splits(str(tmp_path))


def test_plain_mode_needs_dev_and_test_flags(tmp_path):
    src, tgt = write(tmp_path / "t.de", "a\n"), write(tmp_path / "t.en", "b\n")
    with pytest.raises(DataError, match="--dev_src and --dev_tgt are needed"):
        data_load.load_splits("demo", train_src=src, train_tgt=tgt)
    with pytest.raises(DataError, match="--test_src and --test_tgt must be given together"):
        data_load.load_splits("demo", train_src=src, train_tgt=tgt, test_src=src)
    splits = data_load.load_splits("ignored", train_src=src, train_tgt=tgt, dev_src=src, dev_tgt=tgt,
                                   test_src=src, test_tgt=tgt)
    assert splits["test"] == (["a"], ["b"])


# ---------------------------------------------------------------------------
# Demo corpus
# ---------------------------------------------------------------------------


def test_demo_pairs_deterministic_and_seeded():
    first = demo_corpus.generate_pairs(300, seed=3)
    assert first == demo_corpus.generate_pairs(300, seed=3)
    assert first != demo_corpus.generate_pairs(300, seed=4)
    assert len(set(first)) == 300


def test_demo_translation_is_a_function_of_the_german():
    rng = random.Random(11)
    english_of = {}
    for _ in range(20000):
        german, english = demo_corpus.sample_pair(rng)
        assert english_of.setdefault(german, english) == english, german


def test_demo_lexicon_and_sentence_shapes():
    german_size, english_size = demo_corpus.lexicon_size()
    assert german_size >= 300 and english_size >= 300
    pairs = demo_corpus.generate_pairs(2000, seed=1)
    lengths = [len(german.split()) for german, _ in pairs]
    assert 5 <= np.mean(lengths) <= 20 and max(lengths) <= 35
    finite = demo_corpus.finite_verb_forms()
    weil_final = [g for g, _ in pairs if re.search(r", weil [^,]+\.$", g)]
    assert len(weil_final) > 10
    assert all(g.rstrip(".").split()[-1] in finite for g in weil_final)
    clause = demo_corpus.Clause(demo_corpus.Phrase(["der", "Mann"], ["the", "man"]),
                                demo_corpus.lexicon().transitive[0], time=("heute", "today"),
                                obj=demo_corpus.Phrase(["einen", "roten", "Apfel"], ["a", "red", "apple"]))
    assert demo_corpus.german_main(clause, front_time=True) == \
        "heute kauft der Mann einen roten Apfel".split()
    assert demo_corpus.english_statement(clause, front_time=True) == "today the man buys a red apple".split()
    assert demo_corpus.german_subordinate("weil", clause)[-1] == "kauft"


def test_write_demo_corpus_layout_sizes_and_reuse(tmp_path):
    out = str(tmp_path / "demo")
    assert demo_corpus.write_demo_corpus(out, seed=5, n_train=300, n_dev=40, n_test=30) == out
    with open(os.path.join(out, "train.tags.de-en.de"), encoding="utf-8") as f:
        assert f.readline().startswith("<url>")
    splits = data_load.load_splits("demo", demo_dir=out)  # default sizes differ: rewritten
    assert len(splits["train"][0]) == 20000
    stamp = os.path.join(out, demo_corpus.STAMP_FILE)
    mtime = os.path.getmtime(stamp)
    splits = data_load.load_splits("demo", demo_dir=out)
    assert os.path.getmtime(stamp) == mtime  # reused, not rewritten
    assert [len(splits[s][0]) for s in ("train", "dev", "test")] == [20000, 1000, 1000]
    pairs = [set(zip(*splits[s], strict=True)) for s in ("train", "dev", "test")]
    assert not (pairs[0] & pairs[1] or pairs[0] & pairs[2] or pairs[1] & pairs[2])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # temp dirs gone


def test_write_demo_corpus_refuses_foreign_folder(tmp_path):
    write(tmp_path / "precious.txt", "keep me")
    with pytest.raises(FileExistsError):
        demo_corpus.write_demo_corpus(str(tmp_path), n_train=10, n_dev=2, n_test=2)
    assert (tmp_path / "precious.txt").exists()


# ---------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_spm(tmp_path_factory):
    pairs = demo_corpus.generate_pairs(1500, seed=2)
    german, english = [p[0] for p in pairs], [p[1] for p in pairs]
    cache = str(tmp_path_factory.mktemp("spm"))
    return data_load.load_or_train_spm(german, english, 500, cache), german, english, cache


def test_spm_round_trip_and_special_ids(demo_spm):
    sp, german, english, _ = demo_spm
    assert [sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()] == [0, 1, 2, 3]
    assert [token_ids.PAD, token_ids.UNK, token_ids.BOS, token_ids.EOS] == [0, 1, 2, 3]
    assert sp.get_piece_size() == 500
    src = data_load.encode_source(sp, german[:20])
    tgt = data_load.encode_target(sp, english[:20])
    assert all(ids[-1] == token_ids.EOS and token_ids.BOS not in ids for ids in src)
    assert all(ids[0] == token_ids.BOS and ids[-1] == token_ids.EOS for ids in tgt)
    assert [data_load.decode_ids(sp, ids) for ids in src] == german[:20]
    assert data_load.decode_ids(sp, tgt[0] + [token_ids.PAD] * 2) == english[0]
    assert sp.decode(token_ids.strip_ids(tgt[0])) == english[0]
    assert data_load.decode_ids(sp, np.array(tgt[1] + tgt[2])) == english[1]  # stops at eos


def test_spm_cache_reused_and_retrained(demo_spm, monkeypatch):
    _, german, english, cache = demo_spm
    models = os.listdir(cache)
    assert len(models) == 1 and models[0].startswith("spm_")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    with monkeypatch.context() as patch:
        patch.setattr(data_load, "_train_spm", no_training)
        data_load.load_or_train_spm(german, english, 500, cache)
    data_load.load_or_train_spm(german, english, 400, cache)
    data_load.load_or_train_spm(german[:-1], english[:-1], 400, cache)
    assert len(os.listdir(cache)) == 3


def test_spm_tiny_corpus(tmp_path):
    """A 10-line corpus trains; a vocabulary it cannot fill is a clear error naming the size."""
    lines = [f"Satz Nummer {i} ist kurz." for i in range(10)]
    with pytest.raises(data_load.DataError, match=r"--vocab_size 8000 .*\((\d+) pieces\)") as err:
        data_load.load_or_train_spm(lines, lines, 8000, str(tmp_path))
    fits = int(re.search(r"\((\d+) pieces\)", str(err.value)).group(1))
    assert 4 < fits < 8000
    sp = data_load.load_or_train_spm(lines, lines, fits, str(tmp_path))
    assert sp.get_piece_size() == fits
    assert data_load.decode_ids(sp, data_load.encode_source(sp, lines[:1])[0]) == lines[0]


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def test_filter_by_length_counts():
    src = [[5, 3], [5, 6, 7, 3], [5, 3]]
    tgt = [[2, 5, 3], [2, 5, 3], [2, 5, 6, 7, 3]]
    kept_src, kept_tgt, dropped = data_load.filter_by_length(src, tgt, maxlen1=3, maxlen2=4)
    assert kept_src == [[5, 3], [5, 3]] and kept_tgt == [[2, 5, 3], [2, 5, 6, 7, 3]] and dropped == 1
    assert data_load.filter_by_length(src, tgt, 2, 2)[2] == 2


def random_pairs(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    src = [list(rng.integers(4, 50, rng.integers(1, 40))) + [3] for _ in range(n)]
    tgt = [[2] + list(rng.integers(4, 50, rng.integers(1, 40))) + [3] for _ in range(n)]
    return src, tgt


def pair_keys(batches) -> list[tuple]:
    keys = []
    for src, tgt in batches:
        for s_row, t_row in zip(src, tgt, strict=True):
            keys.append((tuple(s_row[s_row != 0]), tuple(t_row[t_row != 0])))
    return keys


def test_train_batches_budget_coverage_determinism():
    src, tgt = random_pairs(500)
    src.append(list(range(4, 204)) + [3])  # longer than the budget: a batch of its own
    tgt.append([2, 5, 3])
    batches = data_load.train_batches(src, tgt, batch_tokens=150, seed=1, epoch=0)
    for s, t in batches:
        assert s.dtype == np.int32 and t.dtype == np.int32 and len(s) == len(t)
        assert len(s) == 1 or len(s) * max(s.shape[1], t.shape[1]) <= 150
    expected = sorted((tuple(s), tuple(t)) for s, t in zip(src, tgt, strict=True))
    assert sorted(pair_keys(batches)) == expected
    again = data_load.train_batches(src, tgt, 150, seed=1, epoch=0)
    assert pair_keys(again) == pair_keys(batches)
    other_epoch = data_load.train_batches(src, tgt, 150, seed=1, epoch=1)
    assert pair_keys(other_epoch) != pair_keys(batches)
    assert sorted(len(s) for s, _ in other_epoch) == sorted(len(s) for s, _ in batches)


def test_eval_batches_keep_everything_and_restore_order():
    src = [[5] * n + [3] for n in (7, 1, 300, 4, 2)]
    batches = data_load.eval_batches(src, batch_size=2)
    assert [len(ids) for ids, _ in batches] == [2, 2, 1]
    restored = [None] * len(src)
    for indices, array in batches:
        assert array.dtype == np.int32
        for index, row in zip(indices, array, strict=True):
            restored[index] = [int(x) for x in row if x != 0]
    assert restored == src


# ---------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------


def test_real_multi30k_gz(shared_data):
    folder = os.path.join(shared_data, "multi30k")
    de, en = data_load.read_parallel(os.path.join(folder, "val.de.gz"), os.path.join(folder, "val.en.gz"))
    assert len(de) == len(en) == 1014 and all(de) and all(en)


def test_real_iwslt16_xml_sets(shared_data):
    folder = os.path.join(shared_data, "iwslt16", "raw-xml")
    de, en = data_load.read_parallel(*data_load._iwslt_set_paths(folder, "tst2013"))
    assert len(de) == len(en) == 993
    assert de[0].startswith("Als ich 11 Jahre alt war") and not any("<" in s for s in de + en)
    de, en = data_load.read_parallel(*data_load._iwslt_set_paths(folder, "TEDX.tst2014"))
    assert len(de) == len(en) == 1414  # the two files differ in metadata lines only


def test_real_wmt_sgm(shared_data):
    folder = os.path.join(shared_data, "wmt", "newstest2014-full-sgm")
    de, en = data_load.read_parallel(os.path.join(folder, "newstest2014-deen-src.de.sgm"),
                                     os.path.join(folder, "newstest2014-deen-ref.en.sgm"))
    assert len(de) == len(en) == 3003 and en[0] == "Gutach: Increased safety for pedestrians"


def test_real_iwslt17_train_tags_excerpt(shared_data):
    folder = os.path.join(shared_data, "iwslt17", "hf-dummy-excerpt-16lines")
    de, en = data_load.read_iwslt_train(os.path.join(folder, "train.tags.de-en.de"),
                                        os.path.join(folder, "train.tags.de-en.en"))
    assert len(de) == len(en) == 9 and de[0] == "Vielen Dank, Chris."


def test_spm_cache_write_interrupted_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C between writing the cache and renaming it: no half model, no temp file is left."""
    lines = [f"Satz Nummer {i} ist kurz." for i in range(10)]

    def interrupted(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            data_load.load_or_train_spm(lines, lines, 30, str(tmp_path))
    assert os.listdir(tmp_path) == []
    data_load.load_or_train_spm(lines, lines, 30, str(tmp_path))
    assert [name.startswith("spm_") for name in os.listdir(tmp_path)] == [True]


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("tar")), reason="needs curl and tar")
def test_download_script_checks_the_git_blob_hash(tmp_path):
    """scripts/download_iwslt.sh 2017 on a local archive (file:// URL): the git blob hash of the
    bytes (git hash-object's "blob <size>\\0" + file, SHA-1) must match EXPECTED_GIT_BLOB."""
    source = tmp_path / "src" / "de-en"
    source.mkdir(parents=True)
    for name in ("train.tags.de-en.de", "train.tags.de-en.en", "IWSLT17.TED.tst2013.de-en.de.xml"):
        write(source / name, "x\n")
    archive = tmp_path / "de-en.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="de-en")
    data = archive.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "download_iwslt.sh")

    def run(dest, expected):
        env = dict(os.environ, IWSLT_URL=archive.as_uri(), EXPECTED_GIT_BLOB=expected)
        return subprocess.run(["bash", script, "2017", str(dest)], env=env, capture_output=True,
                              text=True, timeout=60)

    proc = run(tmp_path / "good", blob)
    assert proc.returncode == 0, proc.stderr
    assert f"verified: git blob hash {blob}" in proc.stdout
    assert sorted(os.listdir(tmp_path / "good"))[0] == "IWSLT17.TED.tst2013.de-en.de.xml"
    proc = run(tmp_path / "bad", "0" * 40)
    assert proc.returncode == 1 and "git blob hash mismatch" in proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.parametrize("year, check", [("2016", "SHA-256 425a3688e0faff00"),
                                         ("2017", "git blob hash cca21523")])
def test_download_script_without_network_says_how_to_go_on(tmp_path, year, check):
    """A download that fails (here a file:// address that does not exist, as a machine without
    network fails) names the address, how to bring the archive by hand (IWSLT_URL=file://...),
    the hash it will be checked against, and which files --data reads."""
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "download_iwslt.sh")
    dest = tmp_path / "iwslt"
    env = dict(os.environ, IWSLT_URL=(tmp_path / "missing.tgz").as_uri())
    proc = subprocess.run(["bash", script, year, str(dest)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and not dest.exists()
    for words in (f"download failed: {(tmp_path / 'missing.tgz').as_uri()}", "IWSLT_URL=file://", check,
                  f"{dest}/train.tags.de-en.de", f"IWSLT{year[2:]}.TED.<set>.de-en.de.xml", "Train on IWSLT"):
        assert words in proc.stderr, (words, proc.stderr)


def test_a_corrupt_gzip_body_is_a_data_error(tmp_path):
    """A .gz whose header is fine but whose compressed data is not: a DataError naming the file
    (zlib.error is neither an OSError nor an EOFError)."""
    data = bytearray(gzip.compress(b"ein Satz hier\n" * 200))
    for i in range(14, 24):  # past the 10-byte header: the deflate stream
        data[i] ^= 0xFF
    path = tmp_path / "train.de.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(data_load.DataError, match=rf"^{path}: cannot read \(Error -3 "):
        data_load.read_lines(str(path))
