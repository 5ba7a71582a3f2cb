"""Datasets in object storage against a real S3 API (moto on 127.0.0.1, tests/storage_server.py):
atomic publication, the same rows as from disk, retries through the fault proxy, clear failures."""
import numpy as np
import pytest

from cluster.data import storage
from cluster.data.tokenizer import ByteTokenizer
from cluster.data.tokens import GlobalOrder, ShardedBatches, TokenDataset, read_meta, write_dataset
from cluster.train.driver import storage_root
from tests.storage_server import BUCKET


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


WRITE = dict(seq_len=32, rows_per_shard=64, seed=3)


@pytest.fixture(scope="module")
def datasets(s3, tmp_path_factory):
    """The same corpus written to disk and to the bucket."""
    local = tmp_path_factory.mktemp("ds") / "local"
    write_dataset(corpus(), local, ByteTokenizer(), **WRITE)
    uri = f"s3://{BUCKET}/datasets/small"
    write_dataset(corpus(), uri, ByteTokenizer(), **WRITE)
    return local, uri


@pytest.fixture
def via_proxy(s3, monkeypatch):
    """Requests go through the fault proxy; faults and retry counts start from zero."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.proxy.endpoint)
    s3.proxy.clear()
    before = storage.STATS.retries
    yield s3.proxy, lambda: storage.STATS.retries - before
    s3.proxy.clear()


def test_publication_is_atomic_and_reads_back_the_same_rows(datasets):
    local, uri = datasets
    root = storage.locate(uri)
    names = [c.name for c in root.children()]
    assert "meta.json" in names and all(n.endswith((".parquet", ".json")) for n in names)
    # The staging prefix is gone: the bucket holds only the dataset.
    assert [c.name for c in storage.locate(f"s3://{BUCKET}/datasets").children()] == ["small"]
    assert read_meta(uri) == read_meta(local)
    for split in ("train", "val"):
        a, b = TokenDataset(local, split), TokenDataset(uri, split)
        np.testing.assert_array_equal(a.get(np.arange(len(a))), b.get(np.arange(len(b))))


def test_existing_dataset_is_not_overwritten_unless_asked(datasets):
    _, uri = datasets
    with pytest.raises(FileExistsError, match=f"'{uri}' already exists"):
        write_dataset(corpus(), uri, ByteTokenizer(), **WRITE)


def test_a_publish_that_fails_before_meta_json_leaves_no_dataset(s3, via_proxy):
    proxy, _ = via_proxy
    uri = f"s3://{BUCKET}/datasets/broken"
    proxy.arm("403", 10**6, match="broken/meta.json", method="PUT")  # the last copy is refused
    with pytest.raises(storage.StorageError, match="AccessDenied|ACCESS_DENIED|access denied"):
        write_dataset(corpus(), uri, ByteTokenizer(), **WRITE)
    proxy.clear()
    with pytest.raises(FileNotFoundError, match="has no meta.json: not a dataset"):
        read_meta(uri)
    assert not [c for c in storage.locate(f"s3://{BUCKET}/datasets").children() if ".tmp-" in c.name]


def test_prefetch_reads_the_same_batches_in_the_same_order(datasets):
    _, uri = datasets
    meta = read_meta(uri)
    order = GlobalOrder(meta.rows_per_shard("train"), seed=5)
    plain = ShardedBatches(TokenDataset(uri), order, 16, 4, rank=1, world_size=2)
    ahead = TokenDataset(uri, prefetch=True)
    fetched = ShardedBatches(ahead, order, 16, 4, rank=1, world_size=2)
    steps = meta.num_train // 16 + 2  # past an epoch boundary
    for step in range(steps):
        for x, y in zip(plain.batches_for_step(step * 16), fetched.batches_for_step(step * 16)):
            np.testing.assert_array_equal(x, y)
    assert ahead.stats.stalls >= 1 and ahead.stats.shard_reads >= len(meta.shards["train"])
    ahead.close()


def test_shard_after_is_the_next_shard_the_order_visits():
    order = GlobalOrder([5, 3, 7, 2], seed=1)
    shard_of = np.searchsorted(np.cumsum([0, 5, 3, 7, 2]), order.rows(0, 3 * 17), side="right") - 1
    for g in range(2 * 17):
        # The next visit starts where the shard changes or a new epoch begins (it may revisit the shard).
        h = next(h for h in range(g + 1, 3 * 17) if shard_of[h] != shard_of[g] or h % 17 == 0)
        assert order.shard_after(g) == shard_of[h], g


def test_connection_resets_and_503s_are_retried_and_counted(datasets, via_proxy, capsys):
    local, uri = datasets
    proxy, retries = via_proxy
    ds = TokenDataset(uri, timeout_s=5)
    proxy.arm("reset", 3, match="train-", method="GET")
    proxy.arm("503", 2, match="train-", method="GET")
    rows = ds.get(np.arange(len(ds)))
    np.testing.assert_array_equal(rows, TokenDataset(local).get(np.arange(len(ds))))
    assert proxy.injected == {"reset": 3, "503": 2}
    assert retries() == 5
    out = capsys.readouterr().out
    assert out.count("connection reset; retry") == 3 and out.count("throttled; retry") == 2  # 503 SlowDown
    assert f"read shard {uri}/train-0000" in out


def test_a_stall_beyond_the_read_timeout_is_retried(datasets, via_proxy, capsys):
    local, uri = datasets
    proxy, retries = via_proxy
    ds = TokenDataset(uri, timeout_s=1)
    proxy.arm("stall", 1, match="train-00001", method="GET", seconds=4)
    np.testing.assert_array_equal(ds.get(np.arange(len(ds))), TokenDataset(local).get(np.arange(len(ds))))
    assert proxy.injected == {"stall": 1} and retries() == 1
    assert "train-00001.parquet: timeout; retry 1/" in capsys.readouterr().out


def test_permanent_403_fails_at_once_naming_the_uri_and_the_fix(datasets, via_proxy):
    _, uri = datasets
    proxy, retries = via_proxy
    ds = TokenDataset(uri)
    proxy.arm("403", 10**6, match="train-", method="GET")
    with pytest.raises(storage.StorageError) as err:
        ds.get(np.arange(4))
    msg = str(err.value)
    assert f"{uri}/train-0000" in msg and "AWS_ACCESS_KEY_ID" in msg and "access denied" in msg
    assert retries() == 0 and proxy.injected["403"] == 1


def test_retries_are_bounded(datasets, via_proxy):
    _, uri = datasets
    proxy, retries = via_proxy
    ds = TokenDataset(uri, attempts=3)
    proxy.arm("503", 10**6, match="train-", method="GET")
    with pytest.raises(storage.StorageError, match="failed after 3 attempts"):
        ds.get(np.arange(4))
    assert retries() == 2


def test_a_missing_shard_is_named(s3, datasets):
    _, uri = datasets
    copy = f"s3://{BUCKET}/datasets/missing"
    root, dst = storage.locate(uri), storage.locate(copy)
    for rel, _ in root.files():
        dst.join(rel).write_bytes(root.join(rel).read_bytes())
    ds = TokenDataset(copy)
    dst.fs.delete_file(dst.join("train-00002.parquet").path)
    with pytest.raises(FileNotFoundError, match=f"shard {copy}/train-00002.parquet is missing"):
        ds.get(np.arange(len(ds)))
    with pytest.raises(ValueError, match=f"missing: {copy}/train-00002.parquet"):
        read_meta(copy)


def test_credentials_in_a_uri_are_refused():
    with pytest.raises(ValueError, match="has credentials in it.*AWS_ACCESS_KEY_ID"):
        storage.locate("s3://AKIAXXXX:verysecret@bucket/runs")


def test_relative_storage_under_a_ray_job_goes_to_a_durable_place(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert storage_root("runs").path == str(tmp_path / "runs")  # outside a Ray job: the working directory
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what the job supervisor sets
    monkeypatch.setenv("RAYMOE_STORAGE_PATH", str(tmp_path / "durable"))
    assert storage_root("runs").path == str(tmp_path / "durable" / "runs")
    assert f"storing runs under {tmp_path / 'durable' / 'runs'}" in capsys.readouterr().out
    monkeypatch.delenv("RAYMOE_STORAGE_PATH")
    assert storage_root("runs").path == str(storage.locate("~/ray_results/runs").path)
    assert storage_root(str(tmp_path / "abs")).path == str(tmp_path / "abs")  # explicit: kept
    assert storage_root(f"s3://{BUCKET}/runs").uri == f"s3://{BUCKET}/runs"


def test_the_sdks_fault_messages_are_classified_by_kind():
    from cluster.data.storage import transient_kind
    kinds = {
        # A 503 whose XML body the SDK parsed, and one it did not (CI saw the second on a GetObject).
        "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.": "throttled",
        "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: No response body.": "throttled",
        "AWS Error UNKNOWN (HTTP status 500) during GetObject operation: No response body.": "server error 5xx",
        "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when receiving "
        "data from the peer": "connection reset",
        "AWS Error ACCESS_DENIED during GetObject operation: Access Denied": None,
        "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.": None,
    }
    assert {msg: transient_kind(OSError(msg)) for msg in kinds} == kinds
