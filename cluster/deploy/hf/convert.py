"""Streaming conversion between a Hugging Face model directory and a raymoe run directory.

Import reads `config.json`, maps it to a raymoe model config (families.py), then reads the
safetensors files (one, or sharded with `model.safetensors.index.json`) tensor by tensor with
positioned reads (`SafetensorsFile`: the header gives each tensor's byte range), converts each to raymoe's layout and writes a weights-only checkpoint
(cluster/checkpoint.py `save_weights`): the step-0 starting point that `jobs.train --name` trains
from on any layout. Export loads a run's checkpoint on one process (every expert, whatever layout
wrote it) and writes the family's hub layout: per-expert tensors with the names `save_pretrained`
writes, sharded with an index, plus config.json, generation_config.json and the tokenizer.

Only torch, safetensors and tokenizers are needed here; `transformers` is a test dependency.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import archs
from cluster import checkpoint
from cluster.config.job import model_from_dict
from cluster.data.tokenizer import HFTokenizer
from cluster.deploy.hf.families import HFConfigError, HFFamily, Names, family_of, to_raymoe_config

SOURCE_DIR = "hf"  # RUN_DIR/hf: the imported config.json and generation_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved: recomputed, not weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Tensor:
    """One raymoe checkpoint entry and the hub tensors it is made of.

    kind: "same" (one tensor, identical), "w13" (hub gate [F, C] and up [F, C] -> raymoe
    w13 [C, 2F]), "w2" (hub down [C, F] -> raymoe w2 [F, C]).
    """

    ours: str
    theirs: tuple[str, ...]
    kind: str = "same"


def tensor_plan(cfg, names: Names) -> list[Tensor]:
    """Every weight of a raymoe transformer / MoE transformer and its hub names (experts split per
    expert, as checkpoints key them)."""
    plan = [Tensor("embed.weight", ("model.embed_tokens.weight",)), Tensor("norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        plan.append(Tensor("head.weight", ("lm_head.weight",)))
    moe_ids = set(getattr(cfg, "moe_layer_ids", []))
    for i in range(cfg.n_layers):
        r, h = f"layers.{i}.", f"model.layers.{i}."
        plan += [Tensor(r + "attn_norm.weight", (h + "input_layernorm.weight",)),
                 Tensor(r + "mlp_norm.weight", (h + "post_attention_layernorm.weight",))]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            plan.append(Tensor(f"{r}attn.{ours}.weight", (f"{h}self_attn.{theirs}.weight",)))
            if cfg.attn_bias == "qkvo" or (cfg.attn_bias == "qkv" and ours != "wo"):
                plan.append(Tensor(f"{r}attn.{ours}.bias", (f"{h}self_attn.{theirs}.bias",)))
        if cfg.qk_norm != "none":
            plan += [Tensor(f"{r}attn.q_norm.weight", (f"{h}self_attn.q_norm.weight",)),
                     Tensor(f"{r}attn.k_norm.weight", (f"{h}self_attn.k_norm.weight",))]
        if i not in moe_ids:
            plan += _mlp(f"{r}mlp.", f"{h}mlp.")
            continue
        m, p = cfg.moe, h + names.moe_prefix
        plan.append(Tensor(f"{r}mlp.router.gate.weight", (f"{p}{names.router}.weight",)))
        gate, up, down = names.expert
        for e in range(m.num_experts):
            x = f"{p}experts.{e}."
            plan += [Tensor(f"{r}mlp.experts.w13.expert{e}", (f"{x}{gate}.weight", f"{x}{up}.weight"), "w13"),
                     Tensor(f"{r}mlp.experts.w2.expert{e}", (f"{x}{down}.weight",), "w2")]
        if m.shared_expert_hidden:
            plan += _mlp(f"{r}mlp.shared.", f"{p}{names.shared}.")
        if m.shared_expert_gate:
            plan.append(Tensor(f"{r}mlp.shared_gate.weight", (f"{p}{names.shared_gate}.weight",)))
    return plan


def _mlp(ours: str, theirs: str) -> list[Tensor]:
    return [Tensor(f"{ours}{a}.weight", (f"{theirs}{b}.weight",))
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]


def to_raymoe(t: Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """fp32 raymoe tensor; transposes are copied straight into their final buffer (one allocation,
    no intermediate concatenation), so converting costs one tensor's memory beyond its sources."""
    if t.kind == "w13":
        gate, up = parts
        F_ = gate.shape[0]
        out = torch.empty(gate.shape[1], 2 * F_, dtype=torch.float32)
        out[:, :F_].copy_(gate.t())
        out[:, F_:].copy_(up.t())
        return out
    if t.kind == "w2":
        return torch.empty(parts[0].shape[::-1], dtype=torch.float32).copy_(parts[0].t())
    return parts[0].float()


def to_hub(t: Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    if t.kind == "w13":
        gate, up = x.t().chunk(2, dim=0)
        return [gate, up]
    if t.kind == "w2":
        return [x.t()]
    return [x]


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class SafetensorsFile:
    """One safetensors file read tensor by tensor with positioned reads (`os.pread`).

    NOTE: not through an mmap: pages of a mapped file stay resident (and count in the process's
    peak RSS) until it is unmapped, so reading a 5 GB shard through one would hold it all. Here
    each tensor is read into its own buffer, converted, and the buffer freed.
    """

    def __init__(self, path: Path):
        import os

        self.path, self.fd = path, os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.entries, self.data_start = header, 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> torch.Tensor:
        import os

        e = self.entries[name]
        if e["dtype"] not in ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has dtype {e['dtype']}, which the importer does not read")
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        while done < len(buf):  # pread may return fewer bytes than asked for
            chunk = os.pread(self.fd, len(buf) - done, self.data_start + begin + done)
            if not chunk:
                raise ValueError(f"{self.path}: truncated (tensor {name} ends past the end of the file)")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
        dtype = ST_DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])  # shares buf: no copy

    def close(self) -> None:
        import os

        os.close(self.fd)


class SafetensorsDir:
    """The tensors of a model directory (one file, or shards with their index), one at a time."""

    def __init__(self, root: Path):
        self.root = root
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (root / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise FileNotFoundError(f"{root}: no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors checkpoints are imported; convert .bin files first)")
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: shard {missing[0]} named in model.safetensors.index.json is missing")
        self.handles = {f: SafetensorsFile(root / f) for f in files}
        if weight_map is None:
            weight_map = {k: files[0] for k in self.handles[files[0]].keys()}
        for name, f in weight_map.items():
            if name not in self.handles[f].entries:
                raise ValueError(f"{root}: the index puts {name} in {f}, which does not hold it")
        self.weight_map = weight_map
        self.bytes = sum((root / f).stat().st_size for f in files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(name)
        return self.handles[self.weight_map[name]].get(name)

    def dtype(self) -> torch.dtype:
        first = next(iter(self.weight_map))
        f = self.handles[self.weight_map[first]]
        return ST_DTYPES.get(f.entries[first]["dtype"], torch.float32)

    def close(self) -> None:
        for h in self.handles.values():
            h.close()


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} does not exist (a Hugging Face model directory has config.json)")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def special_ids(hf_dir: Path, config: dict) -> dict:
    """bos/eos/pad ids: generation_config.json, then config.json, then the tokenizer's named tokens."""
    gen = read_json(hf_dir / "generation_config.json", required=False)
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = gen.get(key, config.get(key))
        ids[key] = v[0] if isinstance(v, list) and v else v
    return ids


def import_hf(hf_dir: str | Path, run_dir: str | Path, progress: Callable[[str], None] = print,
              overrides: dict | None = None) -> dict:
    """Write RUN_DIR (checkpoint_00000000, hf/, tokenizer/) from a Hugging Face model directory;
    return a summary. `overrides`: raymoe model fields set on top of the imported ones (balancing)."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    t0 = time.perf_counter()
    config = read_json(hf_dir / "config.json")
    if config.get("model_type") == "deepseek_v3":
        return _import_deepseek(hf_dir, run_dir, config, progress, overrides, t0)
    fam = family_of(config, str(hf_dir / "config.json"))
    model_dict = to_raymoe_config(config, str(hf_dir / "config.json"))
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            model_dict[k] = {**model_dict.get(k, {}), **v}
        else:
            model_dict[k] = v
    model_cfg = model_from_dict(model_dict)
    ckpt = run_dir / checkpoint.dir_name(0)
    if checkpoint.list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints; import into a new run name")
    reader = SafetensorsDir(hf_dir)
    progress(f"{fam.model_type} -> raymoe {model_cfg.arch}: tensors from {len(reader.handles)} file(s), "
             f"{reader.bytes / 2**20:.1f} MB")
    try:
        state = convert_weights(model_cfg, fam, reader.get, list(reader.weight_map), str(hf_dir), progress)
        source_dtype = str(reader.dtype()).removeprefix("torch.")
    finally:
        reader.close()
    n_tensors = len(state)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_weights(ckpt, state, model_cfg, {"imported_from": str(hf_dir.resolve()),
                                                    "hf_model_type": fam.model_type})
    del state
    src = run_dir / SOURCE_DIR
    src.mkdir(exist_ok=True)
    for f in ("config.json", "generation_config.json"):
        if (hf_dir / f).is_file():
            shutil.copy2(hf_dir / f, src / f)
    source_dtype = config.get("dtype") or config.get("torch_dtype") or source_dtype
    (src / "raymoe_import.json").write_text(json.dumps({"model_type": fam.model_type, "dtype": source_dtype}, indent=1))
    tok = import_tokenizer(hf_dir, run_dir / "tokenizer", config)
    wall = time.perf_counter() - t0
    progress(f"wrote {ckpt} in {wall:.1f} s" + (f"; tokenizer: {tok.vocab_size} tokens" if tok else "; no tokenizer.json"))
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt), "model_type": fam.model_type, "arch": model_cfg.arch,
            "model": model_dict, "bytes_on_disk": reader.bytes, "tensors": n_tensors, "wall_s": wall,
            "tokenizer_vocab": tok.vocab_size if tok else None}


def _import_deepseek(hf_dir: Path, run_dir: Path, config: dict, progress, overrides: dict | None, t0: float) -> dict:
    """DeepSeek-V3 through its own converter (cluster/deploy/hf_deepseek.py: MLA, FP8 block
    dequantization, the MTP layer skipped with a notice), written as the same kind of run."""
    from cluster.config.job import model_from_dict
    from cluster.config.typed import to_dict
    from cluster.deploy.hf_deepseek import load_hf_deepseek

    if checkpoint.list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints; import into a new run name")
    # NOTE: this converter builds the whole model in memory once (the other families stream).
    model = load_hf_deepseek(hf_dir, log=progress)
    model_dict = to_dict(model.cfg)
    for k, v in (overrides or {}).items():
        model_dict[k] = {**model_dict.get(k, {}), **v} if isinstance(v, dict) else v
    model_cfg = model_from_dict(model_dict)
    state = model.state_dict()
    checkpoint.split_experts(model, state)
    ckpt = run_dir / checkpoint.dir_name(0)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_weights(ckpt, state, model_cfg, {"imported_from": str(hf_dir.resolve()),
                                                    "hf_model_type": "deepseek_v3"})
    n_tensors = len(state)
    del state, model
    src = run_dir / SOURCE_DIR
    src.mkdir(exist_ok=True)
    for f in ("config.json", "generation_config.json"):
        if (hf_dir / f).is_file():
            shutil.copy2(hf_dir / f, src / f)
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if "quantization_config" in config:
        dtype = "bfloat16"  # FP8 block weights are served dequantized
    (src / "raymoe_import.json").write_text(json.dumps({"model_type": "deepseek_v3", "dtype": dtype}, indent=1))
    tok = import_tokenizer(hf_dir, run_dir / "tokenizer", config)
    wall = time.perf_counter() - t0
    progress(f"wrote {ckpt} in {wall:.1f} s" + (f"; tokenizer: {tok.vocab_size} tokens" if tok else "; no tokenizer.json"))
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt), "model_type": "deepseek_v3", "arch": model_cfg.arch,
            "model": model_dict, "bytes_on_disk": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")),
            "tensors": n_tensors, "wall_s": wall, "tokenizer_vocab": tok.vocab_size if tok else None}


def convert_weights(model_cfg, fam: HFFamily, get: Callable[[str], torch.Tensor], hub_names: list[str],
                    where: str, progress: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """raymoe checkpoint entries (fp32, experts split per global index) from hub tensors fetched one
    at a time by `get(name)`; every hub tensor must find a place, every raymoe weight a source."""
    with torch.device("meta"):  # shapes and keys only: nothing allocated
        skeleton = archs.build(model_cfg)
    shapes = skeleton.state_dict()
    checkpoint.split_experts(skeleton, shapes)  # the per-expert keys every checkpoint uses
    plan = tensor_plan(model_cfg, fam.names)
    state: dict[str, torch.Tensor] = {}
    used = set()
    for n, t in enumerate(plan):
        try:
            parts = [get(k) for k in t.theirs]
        except KeyError as e:
            raise ValueError(f"{where}: tensor {e.args[0]} is missing (needed for raymoe {t.ours}); the "
                             "checkpoint does not match its config.json") from None
        used.update(t.theirs)
        x = to_raymoe(t, parts)
        del parts
        want = shapes[t.ours].shape
        if tuple(x.shape) != tuple(want):
            raise ValueError(f"{where}: {', '.join(t.theirs)} gives raymoe {t.ours} of shape {tuple(x.shape)}, "
                             f"config.json implies {tuple(want)}")
        state[t.ours] = x
        if (n + 1) % 500 == 0:
            progress(f"  {n + 1}/{len(plan)} tensors")
    if model_cfg.tie_embeddings and "lm_head.weight" in hub_names:  # a tied copy some checkpoints store
        if not torch.equal(get("lm_head.weight").float(), state["embed.weight"]):
            raise ValueError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight; set tie_word_embeddings: false in config.json")
        used.add("lm_head.weight")
    unused = sorted(k for k in hub_names if k not in used and not k.endswith(IGNORED_TENSORS))
    if unused:
        raise ValueError(f"{where}: {len(unused)} tensors have no place in the raymoe model (first: {unused[0]}); "
                         "the config does not describe them")
    for key, meta_t in shapes.items():  # buffers raymoe adds (the balancing bias): their initial value
        if key not in state:
            if not key.endswith("expert_bias"):
                raise ValueError(f"raymoe {key} has no Hugging Face source tensor (family table incomplete)")
            state[key] = torch.zeros(meta_t.shape, dtype=meta_t.dtype)
    return state


def model_from_hub_tensors(config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """In memory, no files: the raymoe model of a Hugging Face config dict and state dict."""
    fam = family_of(config, "config")
    model_cfg = model_from_dict(to_raymoe_config(config))
    state = convert_weights(model_cfg, fam, tensors.__getitem__, list(tensors), "state dict")
    model = archs.build(model_cfg)
    checkpoint.merge_experts(checkpoint.expert_layout(model), state)
    model.load_state_dict(state)
    return model.eval()


def import_tokenizer(hf_dir: Path, out: Path, config: dict) -> HFTokenizer | None:
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (hf_dir / f).is_file():
            shutil.copy2(hf_dir / f, out / f)
    tok = HFTokenizer.from_files(out / "tokenizer.json", special_ids(hf_dir, config),
                                 read_json(hf_dir / "tokenizer_config.json", required=False))
    tok.save(out / "tokenizer.json")
    return tok


def hub_views(model: torch.nn.Module, plan: list[Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(hub name, view of the model's weight) in plan order: transposes and slices, no copies."""
    sd = model.state_dict()
    out = []
    for t in plan:
        if t.kind == "same":
            x = sd[t.ours]
        else:  # experts: checkpoint key ...w13.expert{e} -> row e of the stacked parameter
            stacked, e = t.ours.rsplit(".expert", 1)
            x = sd[stacked][int(e)]
        out += [(name, part.detach()) for name, part in zip(t.theirs, to_hub(t, x))]
    return out


ST_CODES = {v: k for k, v in ST_DTYPES.items()}


def write_safetensors(path: Path, items: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> int:
    """A safetensors file written tensor by tensor: the header first (shapes are known), then each
    tensor converted to `dtype`, written and dropped, so at most one converted tensor is in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    size = torch.empty((), dtype=dtype).element_size()
    for name, x in items:
        n = x.numel() * size
        header[name] = {"dtype": ST_CODES[dtype], "shape": list(x.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, x in items:
            y = x.to(dtype).contiguous()
            if y.numel():
                f.write(memoryview(y.reshape(-1).view(torch.uint8).numpy()))
            del y
    return offset


def export_hf(run_dir: str | Path, out: str | Path, step: int | None = None, max_shard_bytes: int = 5 * 2**30,
              dtype: str | None = None, family: str | None = None, progress: Callable[[str], None] = print) -> dict:
    """Write the Hugging Face layout of a run's checkpoint (see the module docstring)."""
    from cluster.deploy.load import load_run

    run_dir, out = Path(run_dir), Path(out)
    t0 = time.perf_counter()
    has_tok = (run_dir / "tokenizer" / "tokenizer.json").is_file()
    model, tok, ckpt = load_run(run_dir, step, tokenizer=has_tok)
    cfg = model.cfg
    src = run_dir / SOURCE_DIR
    base = read_json(src / "config.json", required=False)
    info = read_json(src / "raymoe_import.json", required=False)
    kind = family or info.get("model_type")
    if cfg.arch == "deepseek_v3":
        return _export_deepseek(model, run_dir, out, ckpt, max_shard_bytes, dtype or info.get("dtype"), t0, progress)
    if kind is None:
        raise ValueError(f"{run_dir} was not imported from Hugging Face (no {SOURCE_DIR}/raymoe_import.json): give "
                         "--hf-family (llama, mixtral, ...) to choose the layout")
    fam: HFFamily = family_of({"model_type": kind}, "--hf-family")
    if cfg.arch not in ("transformer", "moe_transformer"):
        raise HFConfigError(f"model.arch: {cfg.arch} has no Hugging Face equivalent (transformer, moe_transformer)")
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias") and bool(buf.abs().max() > 0):
            raise HFConfigError(f"{name}: the run trained a routing bias (moe.bias_update_rate > 0), which "
                                f"{fam.model_type} has no tensor for; the export would route differently")
    hf_config = fam.to_hf(cfg, base if base.get("model_type") == fam.model_type else {})
    dtype_name = dtype or info.get("dtype") or "float32"
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype: {dtype_name!r} is not one of {sorted(DTYPES)}")
    hf_config["dtype"] = dtype_name
    if tok is not None and isinstance(tok, HFTokenizer):
        for key, v in tok.special_ids().items():
            hf_config.setdefault(key, v)
    plan = tensor_plan(cfg, fam.names)
    out.mkdir(parents=True, exist_ok=True)
    elem = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    groups, group, size = [], [], 0
    for name, x in hub_views(model, plan):  # cut into shards by converted size, in plan order
        nbytes = x.numel() * elem
        if group and size + nbytes > max_shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append((name, x))
        size += nbytes
    groups.append(group)
    shards, total = [], 0
    for n, items in enumerate(groups):
        path = out / f".shard-{n:05d}.safetensors.tmp"
        nbytes = write_safetensors(path, items, DTYPES[dtype_name])
        shards.append((path, [name for name, _ in items], nbytes))
        total += nbytes
    files = _name_shards(out, shards)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    gen = read_json(src / "generation_config.json", required=False) or {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            gen.setdefault(key, hf_config[key])
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    tok_dir = run_dir / "tokenizer"
    copied = [f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
    for f in copied:
        shutil.copy2(tok_dir / f, out / f)
    wall = time.perf_counter() - t0
    progress(f"wrote {len(files)} safetensors file(s), {total / 2**20:.1f} MB ({dtype_name}), config.json, "
             f"generation_config.json{', tokenizer' if copied else ''} to {out} in {wall:.1f} s")
    return {"out": str(out), "checkpoint": str(ckpt), "model_type": fam.model_type, "files": files,
            "bytes": total, "dtype": dtype_name, "wall_s": wall, "tokenizer_files": copied}


def _export_deepseek(model, run_dir: Path, out: Path, ckpt: Path, max_shard_bytes: int, dtype_name: str | None,
                     t0: float, progress) -> dict:
    """DeepSeek-V3 through its own converter (every expert of the loaded checkpoint, the hub's
    per-expert tensors), with the run's tokenizer and generation config beside it."""
    from cluster.deploy.hf_deepseek import save_hf_deepseek

    dtype_name = dtype_name or "float32"
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype: {dtype_name!r} is not one of {sorted(DTYPES)}")
    save_hf_deepseek(model, out, max_shard_bytes=max_shard_bytes, dtype=DTYPES[dtype_name])
    gen = read_json(run_dir / SOURCE_DIR / "generation_config.json", required=False)
    if gen:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    tok_dir = run_dir / "tokenizer"
    copied = [f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
    for f in copied:
        shutil.copy2(tok_dir / f, out / f)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    total = sum((out / f).stat().st_size for f in files)
    wall = time.perf_counter() - t0
    progress(f"wrote {len(files)} safetensors file(s), {total / 2**20:.1f} MB ({dtype_name}) to {out} in {wall:.1f} s")
    return {"out": str(out), "checkpoint": str(ckpt), "model_type": "deepseek_v3", "files": files,
            "bytes": total, "dtype": dtype_name, "wall_s": wall, "tokenizer_files": copied}


def _name_shards(out: Path, shards: list) -> list[str]:
    """Hub names: model.safetensors alone, else model-0000i-of-0000n.safetensors with an index."""
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        shards[0][0].rename(out / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, (path, keys, _) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(out / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(s[2] for s in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
