"""Shared fixtures: a tiny dataset, and one local Ray cluster for the whole test session."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray 2.60 clusters require a token; clients send it (from ~/.ray/auth_token) only in token mode.
# Set before anything imports ray: it reads the mode at import.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train's controller polls its workers every 2 s by default, so every run waited up to 2 s to
# be seen started and again to be seen finished, and each restart again: polled 8x as often here, a
# tiny run takes ~15 s instead of ~23. Set before the session's cluster starts (its job drivers
# and controllers inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Raylets start their workers at nice 15 by default. Under `make test` the other pytest worker
# runs at nice 0 on the same two cores, and CFS then gives a nice-15 process about 3% of a core
# against it: every Ray Train worker (the whole Ray group, the suite's long pole) crawled while
# CPU tests ran beside it. At nice 0 the two groups share the cores. Read by each raylet at start
# (the session's cluster, the fake autoscaling cluster and the nodes it launches inherit it).
os.environ.setdefault("RAY_worker_niceness", "0")

# Tests use small tensors: one intra-op thread avoids OpenMP spin-waits that make tiny matmuls
# ~1000x slower whenever another process (a Ray worker, a build) holds the other core.
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)


def ensure_ray_token() -> None:
    """Token mode needs a token on disk before `ray start`; a fresh machine (CI) has none, so
    make one the way a user would (`ray get-auth-token --generate`, into ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser().is_file():
        return
    subprocess.run([os.path.join(VENV_BIN, "ray"), "get-auth-token", "--generate"], check=True,
                   capture_output=True, timeout=60)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, for a server a test starts (Ray's head, Prometheus).

    Drawn below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999). A port
    that bind(0) returns is in that range: between closing it and the server binding it, any
    outgoing connection may take it, and the Ray cluster of the other pytest worker opens many.
    CI saw exactly that (EADDRINUSE). Below the range only another listener could take it. No port
    is handed out twice by one process (one `ray start` asks for six before binding any)."""
    import random

    rng = random.SystemRandom()  # not the global generator, which a test may have seeded
    low, high = 20000, min(_ephemeral_low(), 65536) - 1
    for _ in range(200) if high > low else ():
        port = rng.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp: Path) -> None:
    """Kill the processes of the Ray cluster whose temp dir is `temp`, and only those: `ray stop`
    would also take any other cluster on the machine (another test session, a fake cluster)."""
    import signal

    mark = str(temp).encode()
    for _ in range(5):
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int(proc.name) != os.getpid() and mark in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The built-in corpus as 64-token byte sequences (the `debug` preset's length)."""
    from cluster.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "pydoc-byte-64"
    prepare(source="pydoc", out=str(out), tokenizer="byte", seq_len=64)
    return out


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """A dense and an MoE debug model, each trained 40 steps in-process and checkpointed as a
    run (shared by the export and quantization tests, which only read them)."""
    from cluster.config.job import load_config
    from cluster.bench.deploy import train_local

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, config in (("dense", "debug"), ("moe", "moe_debug")):
        job = load_config(config, ["train.steps=40", f"data.path={tiny_data}", "train.eval_interval=0",
                                   "cluster.num_workers=1"])
        out[name] = train_local(job, root / name, log_every=1000)
    return out


def train_fixed_batch(model, vocab: int, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """AdamW steps of next-token loss on one fixed random batch [4, 33]; the losses."""
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def env_with_venv() -> dict:
    """Environment whose `python` and `ray` are this interpreter's (Ray jobs run `python`)."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One `ray start --head` on 127.0.0.1 (2 CPUs, token auth on) shared by every Ray test.

    Yields {"address": GCS address, "dashboard": job-submission URL}. The driver of in-process
    tests connects to it; `ray job submit` tests submit to it.
    """
    import ray

    ensure_ray_token()
    gcs, dash = free_port(), free_port()
    temp = Path("/tmp") / f"raymoe-test-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = env_with_venv()
    cmd = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
           f"--metrics-export-port={free_port()}",  # Ray's own metrics on: raymoe's exporter must coexist
           # Agents on free ports too: with the defaults a second cluster on the machine (another test
           # session) has no job agent, and `ray job submit` fails with "No available agent".
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}",
           "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    address = f"127.0.0.1:{gcs}"
    os.environ["RAY_ADDRESS"] = address
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        ray.shutdown()
        stop_cluster(temp)
        os.environ.pop("RAY_ADDRESS", None)
        shutil.rmtree(temp, ignore_errors=True)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server and a fault-injecting proxy on 127.0.0.1 (tests/storage_server.py), with
    the credentials and endpoint in this process's environment only (never in a config)."""
    from tests.storage_server import S3Server

    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


def pytest_sessionstart(session):
    """Hugging Face's `kernels` distribution (pulled in by transformers >= 5.25) breaks every
    `import transformers` beside raymoe's kernels/ package: stop with the fix instead of ~30
    cryptic ImportErrors. (The check lives apart from cluster/deploy/hf, whose converter takes
    0.75 s to import, so every pytest process does not pay for it.)"""
    from cluster.deploy.transformers_compat import check_transformers_can_import

    try:
        check_transformers_can_import()
    except ImportError as e:
        pytest.exit(f"test environment: {e}", returncode=4)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers, `--dist loadgroup`): every test that needs
    Ray goes to one worker, so the session still starts one Ray cluster, and the tests sharing the
    trained runs go to one worker, so they are trained once."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "ray_cluster" in names or item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif "trained_runs" in names:
            item.add_marker(pytest.mark.xdist_group("trained_runs"))
