"""Data layer: tokenizers, dataset files, the global order and per-rank batch slicing."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.data.tokens import GlobalOrder, ShardedBatches, TokenDataset, batch_indices, eval_batches, micro_batches, read_meta, write_dataset
from cluster.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from cluster.data.prepare import ensure_default_dataset, prepare

REPO = Path(__file__).resolve().parents[1]
TEXT = "Hello, world! Ünïcödé ✓ 日本語 and emoji 🙂\n\ttabs  and  spaces "


def _docs(n=40):
    rng = np.random.default_rng(0)
    words = ["expert", "router", "token", "ray", "shard", "Grüße", "λ", "batch"]
    return [" ".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(n)]


def _write(tmp_path, docs=None, seq_len=16, rows_per_shard=7, **kw):
    return write_dataset(docs or _docs(), tmp_path / "ds", ByteTokenizer(), seq_len,
                         rows_per_shard=rows_per_shard, **kw)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids[:5] == list(b"Hello") and max(ids) < 256 and len(ids) == len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_id]) == TEXT  # eos is skipped
    assert tok.decode([0xE6]) == "\ufffd"  # half a character does not raise


def test_bpe_train_save_load_round_trip(tmp_path):
    tok = BPETokenizer.train(_docs(200), vocab_size=300)
    # Few distinct words: the trainer may run out of pairs to merge before 300.
    assert tok.name == "bpe" and 257 < tok.vocab_size <= 300
    assert len(tok.encode("router router router")) < len("router router router")
    tok.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    for text in (TEXT, "<|endoftext|> is text here", ""):
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")
    assert loaded.decode(loaded.encode("ab") + [loaded.eos_id]) == "ab"


def test_write_dataset_files_and_tokens(tmp_path):
    docs, seq_len = _docs(), 16
    meta = _write(tmp_path, docs, seq_len, val_fraction=0.2)
    stream = np.concatenate([list(d.encode()) + [256] for d in docs])
    n = len(stream) // (seq_len + 1)
    windows = stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)

    root = tmp_path / "ds"
    assert json.loads((root / "meta.json").read_text())["num_train"] == meta.num_train
    assert meta.num_train + meta.num_val == n and meta.num_val == round(0.2 * n)
    assert read_meta(root) == meta
    rows = []
    for split in ("train", "val"):
        assert len(meta.shards[split]) == -(-getattr(meta, f"num_{split}") // 7)
        for shard in meta.shards[split]:
            table = pq.read_table(root / shard.file)
            tokens_type = table.schema.field("tokens").type
            assert pa.types.is_fixed_size_list(tokens_type) and tokens_type.list_size == 17
            assert tokens_type.value_type == pa.int32()
            footer = pq.read_metadata(root / shard.file).metadata
            assert footer[b"tokenizer"] == b"byte" and footer[b"seq_len"] == b"16"
            assert footer[b"vocab_size"] == b"257"
            rows += [tuple(r) for r in table.column("tokens").to_pylist()]
        data = TokenDataset(root, split)
        got = data.get(np.arange(len(data)))
        assert got.dtype == np.int64 and got.shape == (len(data), seq_len + 1)
    assert Counter(rows) == Counter(tuple(w) for w in windows.tolist())
    assert not list(tmp_path.glob("ds.tmp-*"))


def test_token_dataset_get_matches_files(tmp_path):
    _write(tmp_path)
    data = TokenDataset(tmp_path / "ds", "train")
    everything = data.get(np.arange(len(data)))
    idx = np.array([len(data) - 1, 0, 8, 3, 8])
    assert np.array_equal(data.get(idx), everything[idx])
    with pytest.raises(IndexError):
        data.get(np.array([len(data)]))


def test_too_small_corpus_names_seq_len(tmp_path):
    with pytest.raises(ValueError, match="seq_len=64"):
        write_dataset(["tiny"], tmp_path / "ds", ByteTokenizer(), 64)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.iterdir())


def test_missing_empty_and_existing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*jobs.prepare_data --out"):
        read_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        TokenDataset(tmp_path / "empty", "train")
    meta = _write(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(tmp_path, seq_len=8)
    assert read_meta(tmp_path / "ds") == meta
    assert _write(tmp_path, seq_len=8, overwrite=True).seq_len == 8
    assert read_meta(tmp_path / "ds").seq_len == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "empty"]


def test_failed_write_leaves_nothing(tmp_path):
    class Broken(ByteTokenizer):
        def save(self, path):  # fails after the shards are written
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dataset(_docs(), tmp_path / "ds", Broken(), 16)
    assert list(tmp_path.iterdir()) == []


def test_meta_inconsistent_with_files(tmp_path):
    meta = _write(tmp_path)
    (tmp_path / "ds" / meta.shards["train"][-1].file).unlink()
    with pytest.raises(ValueError, match="differ from meta.json"):
        read_meta(tmp_path / "ds")


def _tamper(ds_dir: Path, file: str, rows: int | None = None, seq_len: str | None = None) -> None:
    """Rewrite one shard behind meta.json's back: fewer rows, or a footer claiming another seq_len."""
    table = pq.read_table(ds_dir / file)
    if rows is not None:
        table = table.slice(0, rows)
    if seq_len is not None:
        table = table.replace_schema_metadata({**table.schema.metadata, b"seq_len": seq_len.encode()})
    pq.write_table(table, ds_dir / file)


def test_footers_are_checked_once_by_the_driver_and_each_shard_by_the_worker_that_reads_it(tmp_path, monkeypatch):
    """The driver's check reads every footer; a worker's reads none (64 workers x 10,000 shards
    would be 640,000 GETs before the first step) but still refuses a changed shard when it reads it."""
    from cluster.config.job import load_config
    from cluster.data import tokens
    from cluster.tasks.registry import build_task

    meta = _write(tmp_path)
    ds_dir = tmp_path / "ds"
    footer_reads = []
    real = tokens._read_footer
    monkeypatch.setattr(tokens, "_read_footer", lambda loc: footer_reads.append(loc.name) or real(loc))
    data = load_config("debug", [f"data.path={ds_dir}"]).data
    build_task("lm", data)
    assert sorted(footer_reads) == sorted(s.file for split in ("train", "val") for s in meta.shards[split])

    bad = meta.shards["train"][1].file
    _tamper(ds_dir, bad, rows=3)
    with pytest.raises(ValueError, match=f"shard {ds_dir}/{bad} has 3 rows .* meta.json says 7 rows.*prepare it again"):
        build_task("lm", data)
    footer_reads.clear()
    task = build_task("lm", data, verify="listing")  # a worker
    assert footer_reads == []
    batches = task.train_batches(global_batch=7, micro_batch_size=7, rank=0, world=1, seed=0)
    with pytest.raises(ValueError, match=f"shard {ds_dir}/{bad} has 3 rows"):
        for step in range(len(meta.shards["train"])):
            batches.batches_for_step(step * 7)
    assert footer_reads == []


@pytest.mark.parametrize("threads", [1, 8])
def test_footer_check_names_the_first_bad_shard_in_file_order(tmp_path, threads):
    meta = _write(tmp_path)
    for shard in meta.shards["train"][2:]:
        _tamper(tmp_path / "ds", shard.file, seq_len="99")
    first = meta.shards["train"][2].file
    with pytest.raises(ValueError, match=f"{first} has 7 rows and footer .*b'seq_len': b'99'"):
        read_meta(tmp_path / "ds", threads=threads)
    assert read_meta(tmp_path / "ds", verify="listing") == meta
    # A worker's dataset refuses the shard when it reads it, and reads the good ones.
    ds = TokenDataset(tmp_path / "ds", verify="listing")
    assert ds.get(np.arange(7)).shape == (7, 17)
    with pytest.raises(ValueError, match=f"{first} has 7 rows and footer"):
        ds.get(np.arange(14, 21))


@pytest.mark.parametrize("rows", [[5], [7, 7, 3], [1, 4, 2, 9]])
def test_global_order_epochs_are_permutations(rows):
    total = sum(rows)
    order = GlobalOrder(rows, seed=3)
    epoch0, epoch1 = order.rows(0, total), order.rows(total, total)
    assert sorted(epoch0) == list(range(total)) == sorted(epoch1)
    assert order.epoch_of(total - 1) == 0 and order.epoch_of(total) == 1
    # Any split into calls gives the same sequence: the order is a pure function of g.
    pieces = [GlobalOrder(rows, seed=3).rows(s, 3) for s in range(0, 2 * total, 3)]
    assert np.array_equal(np.concatenate(pieces)[: 2 * total], np.concatenate([epoch0, epoch1]))
    if total > 5:
        assert not np.array_equal(epoch0, epoch1)
        assert not np.array_equal(epoch0, GlobalOrder(rows, seed=4).rows(0, total))


def test_indivisible_global_batch_names_field():
    with pytest.raises(ValueError, match="global_batch_size=6.*workers \\(4\\)"):
        batch_indices(0, 6, 0, 4)
    assert micro_batches(10, 5, 2) == [(10, 2), (12, 2), (14, 1)]


def test_world_sizes_read_the_same_rows(tmp_path):
    """Resume on another world size: steps read the same samples, whatever the rank split."""
    _write(tmp_path)
    data = TokenDataset(tmp_path / "ds", "train")
    order = GlobalOrder(data.rows_per_shard, seed=0)
    global_batch = 4
    for step in range(3 * len(data) // global_batch):  # crosses epoch boundaries
        per_world = {}
        for world in (1, 2, 4):
            loaders = [ShardedBatches(data, order, global_batch, 1, rank, world)
                       for rank in range(world)]
            per_world[world] = np.concatenate(
                [b for loader in loaders for b in loader.batches_for_step(step * global_batch)])
        assert np.array_equal(per_world[1], per_world[2])
        assert np.array_equal(per_world[1], per_world[4])
    loader = ShardedBatches(data, order, global_batch, 3, 0, 1)
    assert [len(b) for b in loader.batches_for_step(0)] == [3, 1]
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedBatches(data, order, global_batch, 1, 0, 3)


def test_eval_batches_cover_prefix(tmp_path):
    _write(tmp_path, val_fraction=0.3)
    val = TokenDataset(tmp_path / "ds", "val")
    for world in (1, 2, 3):
        parts = [eval_batches(val, 5, 2, rank, world) for rank in range(world)]
        got = np.concatenate([b for part in parts for b in part])
        assert np.array_equal(got, val.get(np.arange(5)))
    assert eval_batches(val, 1, 2, 1, 2) == []


def test_prepare_pydoc_default(tmp_path):
    meta = ensure_default_dataset(tmp_path / "pydoc", seq_len=256)
    assert meta.num_tokens > 100_000 and meta.num_val >= 1 and meta.source.startswith("pydoc")
    assert ensure_default_dataset(tmp_path / "pydoc", seq_len=256) == meta
    with pytest.raises(ValueError, match="seq_len=128"):
        ensure_default_dataset(tmp_path / "pydoc", seq_len=128)
    assert load_tokenizer(tmp_path / "pydoc").name == "byte"


def test_prepare_bpe_from_files(tmp_path):
    (tmp_path / "text" / "sub").mkdir(parents=True)
    for i, doc in enumerate(_docs(60)):
        (tmp_path / "text" / ("sub" if i % 2 else "") / f"{i}.txt").write_text(doc)
    meta = prepare([str(tmp_path / "text")], tmp_path / "bpe", tokenizer="bpe", vocab_size=300,
                   seq_len=8)
    assert meta.num_documents == 60 and meta.tokenizer == "bpe"
    tok = load_tokenizer(tmp_path / "bpe")
    assert tok.vocab_size == meta.vocab_size and tok.eos_id == meta.eos_id
    row = TokenDataset(tmp_path / "bpe", "train").get(np.array([0]))[0]
    assert tok.decode(tok.encode(tok.decode(row))) == tok.decode(row)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare([str(tmp_path / "missing")], tmp_path / "x")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        prepare([str(tmp_path / "blank.txt")], tmp_path / "x")


def test_prepare_data_help():
    result = subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--tokenizer" in result.stdout
