"""Hugging Face import/export (cluster/deploy/hf) against transformers itself, on tiny random models
of each family (tests/hf_models.py; nothing downloaded)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import FAMILIES, build_hf_model, hf_config, write_hf_dir  # noqa: E402

from archs.sampling import generate  # noqa: E402
from cluster.deploy.hf import HFConfigError, export_hf, import_hf, to_raymoe_config  # noqa: E402
from cluster.deploy.hf.convert import model_from_hub_tensors  # noqa: E402
from cluster.deploy.hf.families import COMMON_INERT  # noqa: E402
from cluster.deploy.load import load_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4


def logits_of(hf_model, x: torch.Tensor) -> torch.Tensor:
    return hf_model(x, return_dict=True).logits


def safetensors_layout(d: Path) -> dict[str, tuple]:
    """{name: (shape, dtype)} over every safetensors file of a model directory."""
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def hub_tensors_of(hf_model, out: Path) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes (transformers 5 fuses experts in memory, not on disk)."""
    from safetensors.torch import load_file

    hf_model.save_pretrained(str(out))
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Every family: the transformers model, its save_pretrained directory (sharded) and the raymoe run."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in FAMILIES:
        src, run = root / f"src-{fam}", root / f"run-{fam}"
        hf = write_hf_dir(fam, src)
        import_hf(src, run, progress=lambda m: None)
        out[fam] = (hf, src, run)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_logits_equal_transformers(imported, family):
    hf, src, run = imported[family]
    model, _, _ = load_run(run)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for shape in ((2, 40), (1, 7)):  # a batch, and a shorter sequence
        x = torch.randint(0, 320, shape, generator=g)
        with torch.no_grad():
            diff = float((logits_of(hf, x) - model(x)).abs().max())
        worst = max(worst, diff)
    print(f"[hf] {family}: max |logit diff| {worst:.2e}")
    assert worst < TOL
    assert len(list(src.glob("model-*.safetensors"))) > 1 and (src / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_transformers_generate(imported, family):
    """20 greedy tokens: equal wherever raymoe's top-2 margin exceeds 1e-3 (teacher-forced on
    transformers' sequence, so one near-tie does not make the rest incomparable), and raymoe's own
    KV-cache generation agrees up to the first near-tie."""
    hf, _, run = imported[family]
    model, _, _ = load_run(run)
    prompt = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0)
        logits = model(ref[:, :-1])[:, prompt.shape[1] - 1:]  # predictions of the 20 new tokens
        ours = generate(model, prompt, 20, temperature=0.0)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    match = logits.argmax(-1) == ref[:, prompt.shape[1]:]
    print(f"[hf] {family}: greedy positions matched {int((match & clear).sum())}/{int(clear.sum())} "
          f"(of {clear.numel()}; {int((~clear).sum())} near-ties skipped)")
    assert bool(match[clear].all()) and int(clear.sum()) >= 30
    for b in range(prompt.shape[0]):
        first_tie = int((~clear[b]).nonzero()[0]) if bool((~clear[b]).any()) else 20
        n = prompt.shape[1] + first_tie
        assert torch.equal(ours[b, :n], ref[b, :n])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_save_pretrained_and_reloads(imported, family, tmp_path):
    import transformers

    hf, src, run = imported[family]
    model, _, _ = load_run(run)
    out = tmp_path / "export"
    export_hf(run, out, max_shard_bytes=100_000, progress=lambda m: None)
    assert safetensors_layout(out) == safetensors_layout(src)  # names, shapes, dtypes of save_pretrained
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(safetensors_layout(out))
    assert all((out / f).is_file() for f in ("config.json", "generation_config.json", "tokenizer.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded) is type(hf)
    x = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert float((logits_of(reloaded, x) - model(x)).abs().max()) < TOL
    assert reloaded.generation_config.eos_token_id == hf.generation_config.eos_token_id


def test_export_in_bf16_writes_bf16_tensors(imported, tmp_path):
    _, src, run = imported["mixtral"]
    export_hf(run, tmp_path / "bf16", dtype="bfloat16", progress=lambda m: None)
    layout = safetensors_layout(tmp_path / "bf16")
    assert set(layout) == set(safetensors_layout(src)) and {d for _, d in layout.values()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_ids_equal_autotokenizer(imported):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    _, src, run = imported["llama"]
    _, tok, _ = load_run(run)
    ref = AutoTokenizer.from_pretrained(str(src))
    docs = [topics[k][:400] for k in sorted(topics)[50:55]] + ["  mixed ünïcödé\ttext\n</s> with specials"]
    for doc in docs:
        assert tok.encode(doc) == ref(doc, add_special_tokens=False)["input_ids"]
        assert tok.encode_prompt(doc) == ref(doc)["input_ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.decode(tok.encode(docs[0])) == docs[0]


# --- every config field honoured or refused ------------------------------------------------------

# A non-default value for each field whose generic probe (flip a bool, scale a number) would not
# build a valid transformers config.
PROBES = {
    "vocab_size": 352, "hidden_size": 96, "intermediate_size": 80, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 1, "max_position_embeddings": 64, "head_dim": 32,
    "num_experts": 12, "num_local_experts": 12, "num_experts_per_tok": 3, "moe_intermediate_size": 40,
    "shared_expert_intermediate_size": 40, "decoder_sparse_step": 3, "mlp_only_layers": [0],
    "bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 7, "sliding_window": 16, "max_window_layers": 1,
    "clip_qkv": 4.0, "hidden_act": "gelu", "dtype": "bfloat16", "problem_type": "regression",
    "rope_parameters": {"rope_type": "linear", "rope_theta": 5e4, "factor": 3.0},
    "architectures": ["SomethingForCausalLM"], "id2label": {0: "a", 1: "b", 2: "c"},
    "label2id": {"a": 0, "b": 1, "c": 2}, "chunk_size_feed_forward": 4, "pretraining_tp": 2,
    "layer_types": ["sliding_attention"] * 3, "_name_or_path": "elsewhere", "transformers_version": "0.0",
}
SKIP = {"model_type"}  # the family key itself


def probe(name: str, default):
    if name in PROBES:
        return PROBES[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default * 0.5 + 0.1 if isinstance(default, float) else default + 1
    raise AssertionError(f"no probe value for config field {name!r} (default {default!r}): add one to PROBES")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_config_field_is_honoured_or_refused(family, tmp_path):
    """Walk the fields of the family's transformers config class: with each set to a non-default
    value, the import either refuses naming the field, or gives logits equal to transformers'
    (and for training-only fields, the raymoe config carries the value)."""
    cls = type(hf_config(family))
    defaults = cls().to_dict()
    base = hf_config(family).to_dict()
    honoured, refused = [], []
    for name, default in sorted(defaults.items()):
        if name in SKIP:
            continue
        value = probe(name, base.get(name, default))
        if name == "layer_types":
            value = ["sliding_attention"] * base["num_hidden_layers"]
        extra = {"num_experts_per_tok": 2} if name in ("num_experts", "num_local_experts") else {}
        if name == "use_sliding_window":
            extra = {"sliding_window": 16}
        if name == "output_attentions":  # transformers allows it with eager attention only
            extra = {"attn_implementation": "eager"}
        cfg = hf_config(family, **{name: value, **extra})
        try:
            raymoe = to_raymoe_config(cfg.to_dict())
        except HFConfigError as e:
            assert repr(name) in str(e) or f"'{name}'" in str(e), f"{name}: refusal does not name it: {e}"
            refused.append(name)
            continue
        honoured.append(name)
        if name in COMMON_INERT:  # output formats and bookkeeping: the model config must not change
            assert raymoe == to_raymoe_config(base), f"{name} is declared inert but changes the raymoe config"
            continue
        if name == "return_dict":  # transformers' own forward breaks with it off; an output format only
            cfg.return_dict = True
        torch.manual_seed(0)
        import transformers

        hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
        from hf_models import spread_weights

        spread_weights(hf)
        ours = model_from_hub_tensors(cfg.to_dict(), hub_tensors_of(hf, tmp_path / name))
        x = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            diff = float((logits_of(hf, x) - ours(x)).abs().max())
        assert diff < TOL, f"{family}.{name}={value!r}: imported without error but logits differ by {diff:.2e}"
        if name == "router_aux_loss_coef":
            assert raymoe["moe"]["aux_loss_coeff"] == pytest.approx(value * raymoe["moe"]["top_k"])
        if name == "initializer_range":
            assert raymoe["init_std"] == value
    print(f"[hf] {family}: {len(honoured)} fields honoured, {len(refused)} refused: {refused}")
    assert honoured and refused


def test_unknown_fields_and_families_are_refused_by_name():
    cfg = hf_config("llama").to_dict()
    with pytest.raises(HFConfigError, match="'new_field'"):
        to_raymoe_config({**cfg, "new_field": 3})
    with pytest.raises(HFConfigError, match="model_type 'gpt2'"):
        to_raymoe_config({**cfg, "model_type": "gpt2"})
    with pytest.raises(HFConfigError, match="rope_type 'yarn'"):
        to_raymoe_config({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})


def test_hub_style_rope_theta_and_rope_scaling_are_read(tmp_path):
    """Hub files of transformers 4 carry `rope_theta` + `rope_scaling` instead of `rope_parameters`."""
    cfg = hf_config("llama").to_dict()
    params = cfg["rope_parameters"]
    old = {**{k: v for k, v in cfg.items() if k != "rope_parameters"}, "rope_theta": params["rope_theta"], "rope_scaling": {k: v for k, v in params.items() if k != "rope_theta"}}
    assert to_raymoe_config(old) == to_raymoe_config(cfg)
    hf = build_hf_model("llama")
    ours = model_from_hub_tensors(old, hub_tensors_of(hf, tmp_path))
    x = torch.randint(0, 320, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert float((logits_of(hf, x) - ours(x)).abs().max()) < TOL


def test_import_job_cli_and_bad_inputs(tmp_path, capsys):
    src = tmp_path / "src"
    write_hf_dir("olmoe", src, max_shard_size=None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "jobs.import_hf"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A few documents.\n\nEnough to cut into sequences of 32 tokens. " * 40)
    ok = subprocess.run(run + [str(src), "--name", "m", "--storage", str(tmp_path / "runs"), "--seq-len", "32",
                               "--data", str(corpus)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "jobs.train --config" in ok.stdout and (tmp_path / "runs" / "m" / "data" / "meta.json").is_file()
    from jobs.generate import main as generate_main
    from jobs.import_hf import main

    # jobs.generate samples from the imported run with its tokenizer (bos first, as transformers would)
    assert generate_main([str(tmp_path / "runs" / "m"), "--prompt", "The value", "--max-new-tokens", "5",
                          "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The value")
    assert main([str(src), "--name", "m", "--storage", str(tmp_path / "runs")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "clip_qkv": 2.0}))
    assert main([str(src), "--name", "n", "--storage", str(tmp_path / "runs")]) == 2
    assert "'clip_qkv'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "n").exists()  # refused before anything is written


def test_import_and_export_peak_memory_stay_below_one_and_a_half_model_sizes(tmp_path):
    """A ~35 MB model (sharded) imported and exported, each in a fresh process with glibc's default
    malloc (the caching settings would keep freed blocks and hide the true peak)."""
    from cluster.bench.hf import bench_config, measure, write_random_hub_dir

    src = tmp_path / "src"
    nbytes = write_random_hub_dir(bench_config(layers=2, width=192, experts=16, top_k=4, expert_hidden=384,
                                               vocab=4000), src, shard_bytes=10 * 2**20)
    imp = measure("import", src, tmp_path / "run")
    exp = measure("export", tmp_path / "run", tmp_path / "export")
    print(f"[hf] peak RSS above baseline: import {imp['peak_rss_above_baseline_bytes'] / nbytes:.2f}x, "
          f"export {exp['peak_rss_above_baseline_bytes'] / nbytes:.2f}x of {nbytes / 2**20:.0f} MB")
    assert imp["peak_rss_above_baseline_bytes"] < 1.5 * nbytes
    assert exp["peak_rss_above_baseline_bytes"] < 1.5 * nbytes
    assert safetensors_layout(tmp_path / "export") == safetensors_layout(src)


def test_hub_kernels_distribution_is_reported_with_the_fix(monkeypatch):
    """transformers >= 5.25 installs Hugging Face's `kernels`, whose import name is raymoe's kernels/:
    the check names the version and the fix instead of transformers' ImportError deep inside."""
    import importlib.metadata

    from cluster.deploy import transformers_compat as compat

    compat.check_transformers_can_import()  # this environment (the pinned dev extra) has no hub kernels
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.19.1" if name == "kernels" else real(name))
    with pytest.raises(ImportError, match=r"`kernels` 0\.19\.1 is installed.*transformers>=5\.23,<5\.25.*uninstall -y kernels"):
        compat.check_transformers_can_import()
