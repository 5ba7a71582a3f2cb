"""The Ray Data preparation pipeline (cluster/data/pipeline.py) against a plain single-process
reference written here: every source format, tokenizers, mixtures, bad records, determinism
over runs and CPU counts, resume, and bounded memory."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.data.corpus import discover, parse_source
from cluster.data.pipeline import BadRecordsError, CorpusOptions, num_val_rows, prepare_corpus, window_order
from cluster.data.prepare import choose_engine
from cluster.data.tokenizer import ByteTokenizer, JSONTokenizer, load_tokenizer
from cluster.data.tokens import TokenDataset, read_meta

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 32


def topic_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> None:
    """One JSON record per line; raw_lines puts given bytes at given (0-based) line positions."""
    lines = [json.dumps(r).encode() for r in records]
    for at, raw in sorted((raw_lines or {}).items()):
        lines.insert(at, raw)
    data = b"\n".join(lines) + b"\n"
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as f:
            f.write(data)
        data = sink.getvalue().to_pybytes()
    path.write_bytes(data)


def reference_windows(docs: list[str], encode, eos: int, bos: int | None = None) -> np.ndarray:
    """The plain computation: each non-empty document [bos] + tokens + eos, concatenated, cut
    into seq_len + 1 windows, the tail dropped."""
    stream = []
    for d in docs:
        if d:
            stream += ([bos] if bos is not None else []) + list(encode(d)) + [eos]
    width = SEQ_LEN + 1
    n = len(stream) // width
    return np.asarray(stream[: n * width], dtype=np.int64).reshape(n, width)


def dataset_rows(out: Path) -> np.ndarray:
    """Rows in output-position order: val shards, then train shards."""
    parts = []
    for split in ("val", "train"):
        ds = TokenDataset(out, split)
        parts.append(ds.get(np.arange(len(ds))))
    return np.concatenate(parts)


def assert_matches_reference(out: Path, windows_NW: np.ndarray, seed: int = 0) -> None:
    rows_NW = dataset_rows(out)
    n = len(windows_NW)
    assert rows_NW.shape == windows_NW.shape
    order = window_order(n, seed, np.arange(n))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))  # every window exactly once
    np.testing.assert_array_equal(rows_NW, windows_NW[order])
    meta = read_meta(out)
    assert meta.num_val == num_val_rows(n, 0.05) and meta.num_train == n - meta.num_val


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The same kind of text in every format, one source per format, with the documents each
    source holds in key order (files sorted, then lines/rows)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = topic_docs()
    expected = []
    text = root / "text"
    (text / "sub").mkdir(parents=True)
    for i in range(6):
        name = text / ("sub" if i == 5 else "") / (f"doc{i}.md" if i == 5 else f"doc{i}.txt")
        name.write_text(docs[i], encoding="utf-8")
    (text / "empty.txt").write_text("")
    # sorted paths: doc0..doc4.txt, empty.txt, sub/doc5.md
    expected.append(docs[0:5] + ["", docs[5]])
    jdir = root / "jsonl"
    jdir.mkdir()
    parts = [docs[6:20], docs[20:34]]
    for i, part in enumerate(parts):
        write_jsonl(jdir / f"part-{i}.jsonl", [{"text": d, "id": k} for k, d in enumerate(part)],
                    raw_lines={3: b"   "})  # a blank line is no record
    expected.append(parts[0] + parts[1])
    gz = root / "c.jsonl.gz"
    write_jsonl(gz, [{"text": d[::-1]} for d in docs[34:50]])
    expected.append([d[::-1] for d in docs[34:50]])
    zst = root / "d.jsonl.zst"
    write_jsonl(zst, [{"body": d.upper()} for d in docs[50:64]])
    expected.append([d.upper() for d in docs[50:64]])
    parquet = root / "e.parquet"
    pq.write_table(pa.table({"body": docs[64:], "n": list(range(len(docs) - 64))}), parquet, row_group_size=5)
    expected.append(docs[64:])
    return {"root": root, "sources": [str(text), str(jdir), str(gz), str(zst), str(parquet)],
            "expected": expected}


def run(sources, out, ray_cluster, **kw):
    # The cluster's pooled workers: a per-run worker set costs ~15 s of start-up here.
    opts = CorpusOptions(sources=[str(s) for s in sources], out=str(out), seq_len=SEQ_LEN,
                         isolate_workers=False, **kw)
    return prepare_corpus(opts)


def test_window_order_is_a_seeded_bijection():
    for n in (1, 2, 3, 7, 1000, 4097):
        order = window_order(n, 5, np.arange(n))
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        if n >= 9:  # a slice computed alone equals the same slice of the whole
            np.testing.assert_array_equal(order[3:9], window_order(n, 5, np.arange(3, 9)))
    assert not np.array_equal(window_order(1000, 0, np.arange(1000)), window_order(1000, 1, np.arange(1000)))


def test_source_specs_and_engine_choice(corpus, tmp_path):
    assert parse_source("a/b.jsonl.gz:0.7") == ("a/b.jsonl.gz", 0.7)
    assert parse_source("dir/") == ("dir/", None)
    with pytest.raises(ValueError, match="weight"):
        discover([corpus["sources"][1] + ":0.5", corpus["sources"][2]])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([str(tmp_path / "nope")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unknown format"):
        discover([str(tmp_path / "x.csv")])
    found = discover([str(corpus["root"] / "*.jsonl.*")])
    assert [Path(f.path).name for f in found[0].files] == ["c.jsonl.gz", "d.jsonl.zst"]
    assert choose_engine(["pydoc"], "byte") == "local"
    assert choose_engine([corpus["sources"][0]], "bpe") == "local"
    assert choose_engine([corpus["sources"][1]], "byte") == "ray"
    assert choose_engine(["pydoc"], str(tmp_path)) == "ray"


def test_every_format_matches_reference(corpus, ray_cluster, tmp_path):
    """txt/md, jsonl, jsonl.gz and the bundled pydoc text in one run; jsonl.zst and Parquet, whose
    text is in `body`, in a second (--text-field is one per run)."""
    tok = ByteTokenizer()
    out = tmp_path / "a"
    meta, report = run(corpus["sources"][:3] + ["pydoc"], out, ray_cluster)
    docs = [d for group in corpus["expected"][:3] for d in group] + topic_docs()
    assert_matches_reference(out, reference_windows(docs, tok.encode, tok.eos_id))
    assert report["empty_documents"] == 1 and report["bad_records"] == 0
    assert meta.num_documents == sum(1 for d in docs if d)
    assert meta.num_characters == sum(len(d) for d in docs)
    out_b = tmp_path / "b"
    run(corpus["sources"][3:], out_b, ray_cluster, text_field="body")
    docs = [d for group in corpus["expected"][3:] for d in group]
    assert_matches_reference(out_b, reference_windows(docs, tok.encode, tok.eos_id))
    # The dataset is what training reads today.
    assert read_meta(out_b).tokenizer == "byte" and isinstance(load_tokenizer(out_b), ByteTokenizer)


def test_deterministic_over_runs_and_cpu_counts(corpus, ray_cluster, tmp_path):
    sources = corpus["sources"][:3]
    outs = [tmp_path / name for name in ("two-a", "two-b", "one")]
    run(sources, outs[0], ray_cluster, num_cpus=2, rows_per_shard=100)
    run(sources, outs[1], ray_cluster, num_cpus=2, rows_per_shard=100)
    run(sources, outs[2], ray_cluster, num_cpus=1, rows_per_shard=100)
    first = shard_bytes(outs[0])
    assert len([n for n in first if n.endswith(".parquet")]) > 4
    assert shard_bytes(outs[1]) == first
    assert shard_bytes(outs[2]) == first


def test_bpe_and_tokenizer_json_with_bos(corpus, ray_cluster, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    docs = [d for group in corpus["expected"][:2] for d in group]
    # BPE trained by the pipeline on a sample; the windows are its encodings.
    out = tmp_path / "bpe"
    meta, _ = run(corpus["sources"][:2], out, ray_cluster, tokenizer="bpe", vocab_size=400)
    tok = load_tokenizer(out)
    assert meta.tokenizer == "bpe" and tok.vocab_size == meta.vocab_size
    assert_matches_reference(out, reference_windows(docs, tok.encode, tok.eos_id))

    # A foreign tokenizer.json whose template prepends <s> (as Llama's does), no config file.
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=350, special_tokens=["<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    (tmp_path / "imported").mkdir()
    hf.save(str(tmp_path / "imported" / "tokenizer.json"))
    jt = JSONTokenizer.from_path(tmp_path / "imported")
    assert (jt.eos_id, jt.bos_id) == (1, 0)
    out = tmp_path / "json"
    meta, _ = run(corpus["sources"][:2], out, ray_cluster, tokenizer=str(tmp_path / "imported"))
    assert meta.tokenizer == "json" and meta.eos_id == 1
    assert_matches_reference(out, reference_windows(docs, jt.encode, 1, bos=0))
    reloaded = load_tokenizer(out)  # from the dataset's own tokenizer.json + tokenizer_config.json
    assert (reloaded.eos_id, reloaded.bos_id) == (1, 0)
    assert reloaded.decode(reloaded.encode("def f(x):")) == "def f(x):"


def test_weighted_mixture(corpus, ray_cluster, tmp_path):
    """Tokens shares follow the weights; the kept documents are the ones a per-file generator
    seeded by (seed, source, file) keeps, in file order."""
    from cluster.data.pipeline import encode_documents, mixture_keep

    tok = ByteTokenizer()
    sources = [corpus["sources"][1] + ":0.7", corpus["sources"][2] + ":0.3"]
    out = tmp_path / "mix"
    meta, report = run(sources, out, ray_cluster, seed=3)
    files = [[corpus["expected"][1][:14], corpus["expected"][1][14:]], [corpus["expected"][2]]]
    totals = [sum(len(encode_documents(tok, f)[0]) for f in src) for src in files]
    keep = mixture_keep(totals, [0.7, 0.3])
    assert max(keep) == 1.0 and min(keep) < 1.0
    kept = []
    for s, src in enumerate(files):
        for i, docs in enumerate(src):
            u = np.random.default_rng([3, s, i]).random(len(docs))
            kept += [d for d, x in zip(docs, u) if x < keep[s]]
    assert_matches_reference(out, reference_windows(kept, tok.encode, tok.eos_id), seed=3)
    shares = [p["kept_tokens"] / meta.num_tokens for p in report["sources"]]
    assert shares == pytest.approx([0.7, 0.3], abs=0.15)  # documents are whole: shares are near
    assert meta.sources[0]["keep"] == keep[0]


def test_bad_records_counted_located_bounded_and_resumed(ray_cluster, tmp_path):
    docs = topic_docs()
    src = tmp_path / "bad"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": d} for d in docs[:20]] + [{"title": "x"}, {"text": 5}, [1, 2]],
                raw_lines={2: b"{not json", 4: b'{"text": "caf\xe9"}'})
    full = gzip.compress(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs[20:40]))
    (src / "b.jsonl.gz").write_bytes(full[: len(full) // 2])
    pq.write_table(pa.table({"content": docs[40:43]}), src / "c.parquet")
    (src / "d.txt").write_bytes(b"ok\n\xff\xfe broken")
    pq.write_table(pa.table({"text": docs[43:60]}), src / "e.parquet")
    out = tmp_path / "out"
    with pytest.raises(BadRecordsError) as err:
        run([src], out, ray_cluster)
    message = str(err.value)
    for place in (f"{src / 'a.jsonl'}:3: not_json", f"{src / 'a.jsonl'}:5: bad_utf8",
                  f"{src / 'c.parquet'} row 0: missing_column", f"{src / 'd.txt'}:2: bad_utf8"):
        assert place in message
    assert "--max-bad-fraction" in message and not out.exists()
    work = tmp_path / "out.work"
    assert len(list((work / "tok").glob("*.json"))) == 5  # tokenized files kept for the re-run
    # A crash mid-way: one file's result lost; the re-run tokenizes that file only.
    next((work / "tok").glob("*.json")).unlink()
    meta, report = run([src], out, ray_cluster, max_bad_fraction=0.5)
    assert report["reused_files"] == 4 and not work.exists()
    counts = meta.bad_records["counts"]
    assert counts["not_json"] == 1 and counts["bad_utf8"] == 2 and counts["missing_field"] == 1
    assert counts["not_string"] == 1 and counts["not_object"] == 1 and counts["truncated"] == 1
    assert counts["missing_column"] == 3  # the Parquet file's 3 rows
    assert meta.num_bad_records == sum(counts.values()) == report["bad_records"]
    truncated = [b for b in meta.bad_records["first"] if b["kind"] == "truncated"][0]
    assert truncated["file"] == str(src / "b.jsonl.gz") and truncated["line"] > 1
    # The good records, and only those, are in the shards: the lines read before the break too.
    with gzip.open(src / "b.jsonl.gz") as f:
        good_b = []
        try:
            for line in f:
                good_b.append(line)
        except EOFError:
            pass
    good_b = [json.loads(x)["text"] for x in good_b if x.endswith(b"\n")]
    tok = ByteTokenizer()
    kept = docs[:20] + good_b + docs[43:60]
    assert_matches_reference(out, reference_windows(kept, tok.encode, tok.eos_id))


def _prepare_cli(corpus: Path, out: Path, ray_cluster) -> dict:
    env = {k: v for k, v in ray_cluster["env"].items() if not k.startswith("MALLOC_")}  # glibc defaults
    env["PYTHONPATH"] = str(REPO)
    report = out.with_name(out.name + ".json")
    subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--source", str(corpus), "--out", str(out),
                    "--seq-len", "256", "--ray-address", ray_cluster["address"], "--report", str(report)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return json.loads(report.read_text())


def test_peak_memory_flat_when_corpus_grows_4x(ray_cluster, tmp_path):
    """6 MB of JSON text in 2 files vs 24 MB in 4 files of twice the size: the VmHWM of the driver
    and of the largest worker process each grow by less than 20%. (Not their sum: Ray Data ran the
    same job on 1 worker process once and on 2 another time, each ~300 MB of imports alone.)"""
    from cluster.bench.data import make_corpus

    small = make_corpus(tmp_path / "small", 6_000_000, file_bytes=3_000_000)
    large = make_corpus(tmp_path / "large", 24_000_000, file_bytes=6_000_000)
    assert len(list(small.glob("*.gz"))) == 2 and len(list(large.glob("*.gz"))) == 4
    a = _prepare_cli(small, tmp_path / "out-small", ray_cluster)
    b = _prepare_cli(large, tmp_path / "out-large", ray_cluster)
    assert b["text_bytes"] > 3.9 * a["text_bytes"]
    for part in ("driver", "largest_worker"):
        assert b["peak_mb"][part] < 1.2 * a["peak_mb"][part], (part, a["peak_mb"], b["peak_mb"])


def test_cli_dry_run_lists_sources(corpus):
    result = subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--source", corpus["sources"][1] + ":2",
                             corpus["sources"][2] + ":1", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 file(s)" in result.stdout and "weight 2.0" in result.stdout and "part-1.jsonl" in result.stdout
    assert "engine ray" in result.stdout


def test_mixture_sampling_of_a_long_file_matches_one_draw(tmp_path):
    """The mixture stage reads a file's document lengths 4096 at a time; its kept documents are
    those of one draw per document over the whole file."""
    from cluster.data.pipeline import _mix_file

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=10_000)
    stream = np.arange(lengths.sum(), dtype=np.int32)
    (tmp_path / "tok").mkdir()
    stream.astype("<i4").tofile(tmp_path / "tok" / "k.tok")
    np.stack([lengths, lengths * 3], axis=1).astype("<i8").tofile(tmp_path / "tok" / "k.len")
    rep = json.loads(_mix_file({"key": "k", "source": 1, "index": 2, "keep": 0.4}, 7, tmp_path)["report"][0])
    keep = np.random.default_rng([7, 1, 2]).random(len(lengths)) < 0.4
    pieces = np.split(stream, np.cumsum(lengths)[:-1])
    expected = np.concatenate([p for p, k in zip(pieces, keep) if k])
    np.testing.assert_array_equal(np.fromfile(rep["stream"], dtype="<i4"), expected)
    assert (rep["docs"], rep["tokens"], rep["chars"]) == (keep.sum(), len(expected), 3 * len(expected))


def test_truncated_zst_and_parquet_types(tmp_path):
    """A .zst cut short ends the file with one `truncated` record after a prefix of its good
    lines; a Parquet column of the wrong type or with nulls is counted row by row."""
    from cluster.data.corpus import BadRecord, SourceFile, iter_records

    docs = topic_docs()
    write_jsonl(tmp_path / "full.jsonl.zst", [{"text": d} for d in docs])
    data = (tmp_path / "full.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    f = SourceFile(str(tmp_path / "cut.jsonl.zst"), "jsonl", len(data) // 2, 0, 0)
    records = list(iter_records(f))
    assert isinstance(records[-1], BadRecord) and records[-1].kind == "truncated"
    good = records[:-1]
    assert len(good) > 5  # the lines before the break are kept
    assert all(not isinstance(r, BadRecord) for r in good)
    assert [t for _, t in good] == docs[: len(good)] and records[-1].line == len(good) + 1
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "nulls.parquet")
    ints = list(iter_records(SourceFile(str(tmp_path / "ints.parquet"), "parquet", 1, 0, 0)))
    assert [(r.kind, r.line) for r in ints] == [("not_string", 0), ("not_string", 1), ("not_string", 2)]
    nulls = list(iter_records(SourceFile(str(tmp_path / "nulls.parquet"), "parquet", 1, 0, 0)))
    assert nulls[0] == (0, "a") and nulls[2] == (2, "b")
    assert (nulls[1].kind, nulls[1].line, nulls[1].where()) == ("missing_field", 1, f"{tmp_path / 'nulls.parquet'} row 1")


def test_pipeline_publishes_into_a_bucket_byte_identical_to_disk(corpus, ray_cluster, s3, tmp_path):
    """`--out s3://...` through the Ray Data engine: staged locally, uploaded with meta.json last;
    the objects equal the files of the same preparation on disk."""
    from cluster.data import storage
    from tests.storage_server import BUCKET

    sources = corpus["sources"][:2]
    run(sources, tmp_path / "local", ray_cluster)
    uri = f"s3://{BUCKET}/corpus-{os.getpid()}"
    run(sources, uri, ray_cluster)
    remote = storage.locate(uri)
    names = sorted(c.name for c in remote.children())
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir())
    for name in names:
        assert remote.join(name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert read_meta(uri).num_train == read_meta(tmp_path / "local").num_train
