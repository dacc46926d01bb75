"""Packing a checkpoint and reading the pack back: round trip, integrity, bad input, atomicity, CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expert_store import codec
from expert_store.__main__ import main
from expert_store.checkpoint import CheckpointReader
from expert_store.errors import ChecksumError, PackError
from expert_store.pack import ALIGNMENT, write_pack
from expert_store.packfile import Pack
from expert_store import hf_names
from expert_store.model_args import ModelArgs

REPO = Path(__file__).resolve().parents[2]
ALL_FORMATS = ("bf16", "int8", "int4", "int2")


def _cli(*args: str) -> subprocess.Popen:
    """`python -m expert_store ...` as a user runs it (started, not awaited: callers run several at once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "expert_store", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _split_without_index(src: Path, dst: Path, parts: int) -> Path:
    """The same tensors in `parts` files named freely, as some exporters write them (no index)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    for i in range(parts):
        save_file({n: tensors[n] for n in names[i::parts]}, dst / f"part-{i}.safetensors")
    return dst


@pytest.fixture(scope="session")
def ckpts(hf_tiny_mixtral_dir, hf_tiny_qwen2_moe_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt-variants")
    from transformers import MixtralForCausalLM

    sharded = root / "mixtral-sharded"
    MixtralForCausalLM.from_pretrained(hf_tiny_mixtral_dir, dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="100KB")
    return {
        "mixtral": hf_tiny_mixtral_dir,
        "mixtral-sharded": sharded,
        "mixtral-noindex": _split_without_index(hf_tiny_mixtral_dir, root / "mixtral-noindex", 3),
        "qwen2_moe": hf_tiny_qwen2_moe_dir,
    }


@pytest.fixture(scope="session")
def packs(ckpts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packs")
    return {k: write_pack(v, root / k, formats=ALL_FORMATS, progress=False) for k, v in ckpts.items()}


# -- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_round_trip(kind, ckpts, packs):
    ckpt_dir = ckpts[kind]
    args = ModelArgs.from_checkpoint_dir(ckpt_dir)
    with Pack.open(packs[kind]) as pack, CheckpointReader(ckpt_dir) as ckpt:
        assert pack.verify() == []
        assert pack.args == args and pack.formats == ALL_FORMATS and pack.name == ckpt_dir.name
        assert len(pack.expert_ids) == len(args.moe_layers) * args.num_experts
        hidden, inter = args.hidden_size, args.expert_intermediate_size
        for layer, e in pack.expert_ids:
            names = hf_names.expert(args, layer, e)
            for fmt in ALL_FORMATS:
                ref = pack.blob_ref(layer, e, fmt)
                assert ref.offset % ALIGNMENT == 0
                assert ref.nbytes == codec.expert_nbytes(fmt, hidden, inter) == pack.expert_nbytes(fmt)
            gate, up, down = codec.decode_expert("bf16", pack.expert_blob(layer, e, "bf16"), hidden, inter,
                                                 dtype=torch.bfloat16)
            for role, got in zip(("gate", "up", "down"), (gate, up, down)):
                assert torch.equal(got, ckpt.get(names[role])), (layer, e, role)
            # quantized formats decode to the right shapes and near the weights
            g8, _, _ = codec.decode_expert("int8", pack.expert_blob(layer, e, "int8"), hidden, inter)
            assert torch.allclose(g8, ckpt.get(names["gate"]).float(), atol=2e-3)

        dense = pack.dense_tensors()
        assert set(dense) == set(hf_names.dense_tensor_names(args))
        for name, t in dense.items():
            want = ckpt.get(name)
            assert t.dtype == want.dtype and torch.equal(t, want), name

    assert (packs[kind] / "config.json").read_bytes() == (ckpt_dir / "config.json").read_bytes()
    # transformers can read the pack directory's config
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(packs[kind]).model_type == kind


def test_mixtral_tokenizer_copied_qwen_has_none(ckpts, packs):
    with Pack.open(packs["mixtral"]) as pack:
        assert pack.tokenizer_path == packs["mixtral"] / "tokenizer.json"
        assert pack.tokenizer_path.read_bytes() == (ckpts["mixtral"] / "tokenizer.json").read_bytes()
    with Pack.open(packs["qwen2_moe"]) as pack:
        assert pack.tokenizer_path is None
        assert pack.manifest["tokenizer"] is None and pack.manifest["tokenizer_files"] == []


def test_qwen_dense_layer_and_shared_expert_are_dense(packs):
    with Pack.open(packs["qwen2_moe"]) as pack:
        args = pack.args
        assert args.moe_layers == (0, 2) and {l for l, _ in pack.expert_ids} == {0, 2}
        dense = pack.dense_tensors()
        for name in [*hf_names.dense_mlp(args, 1).values(), *hf_names.shared_expert(args, 0).values()]:
            assert name in dense
        with pytest.raises(PackError, match="no expert 0 at layer 1"):
            pack.blob_ref(1, 0, "int4")


@pytest.mark.parametrize("variant", ["mixtral-sharded", "mixtral-noindex"])
def test_sharded_checkpoint_packs_identically(variant, ckpts, packs):
    assert len(list(ckpts[variant].glob("*.safetensors"))) > 1
    single, sharded = packs["mixtral"], packs[variant]
    assert (single / "experts.bin").read_bytes() == (sharded / "experts.bin").read_bytes()
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (single, sharded))
    assert m1["experts"] == m2["experts"] and m1["formats"] == m2["formats"] and m1["model"]["args"] == m2["model"]["args"]
    d1, d2 = load_file(single / "dense.safetensors"), load_file(sharded / "dense.safetensors")
    assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)


# -- integrity ------------------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_is_reported_and_refused(packs, tmp_path, capsys):
    pack_dir = shutil.copytree(packs["mixtral"], tmp_path / "p")
    with Pack.open(pack_dir) as pack:
        ref = pack.blob_ref(1, 5, "int4")
    _flip(pack_dir / "experts.bin", ref.offset + 100)

    assert main(["verify", str(pack_dir), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    bad = [line for line in out.splitlines() if line.startswith("corrupt:")]
    assert len(bad) == 1 and "layer 1 expert 5 int4" in bad[0]
    assert err.startswith("error:") and "1 problem" in err

    with Pack.open(pack_dir) as pack:
        with pytest.raises(ChecksumError, match="layer 1 expert 5 int4") as info:
            pack.expert_blob(1, 5, "int4")
        assert (info.value.layer, info.value.expert, info.value.fmt) == (1, 5, "int4")
        with pytest.raises(ChecksumError):  # refused every time, not only the first
            pack.expert_blob(1, 5, "int4")
        assert len(pack.expert_blob(1, 5, "int2")) == pack.expert_nbytes("int2")  # the rest still serves


def test_corrupt_dense_file_is_refused(packs, tmp_path):
    pack_dir = shutil.copytree(packs["mixtral"], tmp_path / "p")
    _flip(pack_dir / "dense.safetensors", (pack_dir / "dense.safetensors").stat().st_size - 10)
    with Pack.open(pack_dir) as pack:
        assert any("dense.safetensors" in p for p in pack.verify())
        with pytest.raises(ChecksumError, match="dense.safetensors"):
            pack.dense_tensors()


def test_open_refuses_damaged_packs(packs, tmp_path):
    pack_dir = shutil.copytree(packs["qwen2_moe"], tmp_path / "p")
    with open(pack_dir / "experts.bin", "r+b") as f:
        f.truncate(ALIGNMENT)
    with pytest.raises(PackError, match="experts.bin.*truncated"):
        Pack.open(pack_dir)
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    (pack_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(PackError, match="format_version 99"):
        Pack.open(pack_dir)
    with pytest.raises(PackError, match="not a directory"):
        Pack.open(pack_dir / "experts.bin")


def test_old_format_pack_is_refused_with_the_re_pack_command(packs, tmp_path, capsys):
    pack_dir = shutil.copytree(packs["mixtral"], tmp_path / "old")
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    old = {**manifest, "format_version": 1, "codec_layout_version": 1, "checksum": "crc32"}
    old.pop("int4_layout")
    (pack_dir / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(PackError, match=r"older than .*re-pack with `python -m expert_store pack CHECKPOINT_DIR"):
        Pack.open(pack_dir)
    assert main(["inspect", str(pack_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "re-pack with `python -m expert_store pack" in err and len(err.splitlines()) == 1


def test_manifest_records_the_int4_layout_and_xxh3_checksums(packs, tmp_path):
    from expert_store.checksums import blob_digest
    from expert_store.int4_layout import Int4Layout, kernel_fingerprint

    with Pack.open(packs["mixtral"]) as pack:
        assert pack.manifest["checksum"] == "xxh3_64"
        assert pack.int4_layout == Int4Layout.from_record(pack.manifest["int4_layout"])
        assert pack.manifest["int4_layout"]["fingerprint"] == kernel_fingerprint()  # packed on this machine
        ref = pack.blob_ref(0, 3, "int4")
        assert ref.xxh3_64 == blob_digest(pack.expert_blob(0, 3, "int4", verify=False))
    pack_dir = shutil.copytree(packs["mixtral"], tmp_path / "p")
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    (pack_dir / "manifest.json").write_text(json.dumps({**manifest, "int4_layout": {"name": "n64-split",
                                                                                   "fingerprint": "xxh3_64:00"}}))
    with pytest.raises(PackError, match="layout record.*re-pack"):
        Pack.open(pack_dir)


# -- bad input through the CLI --------------------------------------------------------------------


def _bad_inputs(src: Path, root: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """case -> (checkpoint dir, texts the error line must contain)."""
    no_config = _copy_checkpoint(src, root / "no-config")
    (no_config / "config.json").unlink()

    unknown = _copy_checkpoint(src, root / "unknown-family")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))

    args = ModelArgs.from_checkpoint_dir(src)
    gone = hf_names.expert(args, 1, 3)["down"]
    missing = _copy_checkpoint(src, root / "missing-expert")
    tensors = load_file(missing / "model.safetensors")
    del tensors[gone]
    save_file(tensors, missing / "model.safetensors")

    truncated = _copy_checkpoint(src, root / "truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate((truncated / "model.safetensors").stat().st_size // 2)

    return {
        "no-config": (no_config, ("config.json", "missing")),
        "unknown-family": (unknown, ("model_type 'gpt2' is not supported",)),
        "missing-expert": (missing, (gone, "missing", str(missing))),
        "truncated": (truncated, (str(truncated / "model.safetensors"), "truncated")),
    }


def test_bad_input_fails_with_one_error_line(hf_tiny_mixtral_dir, tmp_path):
    cases = _bad_inputs(hf_tiny_mixtral_dir, tmp_path)
    running = {case: _cli("pack", str(d), str(tmp_path / f"out-{case}")) for case, (d, _) in cases.items()}
    for case, proc in running.items():  # started together: each pays the interpreter start-up
        out, err = proc.communicate(timeout=120)
        lines = err.splitlines()
        assert proc.returncode == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith("error:"), (case, err)
        assert all(text in lines[0] for text in cases[case][1]), (case, lines[0])
        assert "Traceback" not in out + err
        assert not (tmp_path / f"out-{case}").exists()


def test_unexpected_tensor_is_a_warning_not_a_silent_drop(hf_tiny_mixtral_dir, tmp_path, caplog):
    src = _copy_checkpoint(hf_tiny_mixtral_dir, tmp_path / "extra")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.some_new_thing.weight"] = torch.zeros(3)
    save_file(tensors, src / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="expert_store"):
        out = write_pack(src, tmp_path / "p", formats=("int2",), progress=False)
    assert "model.layers.0.some_new_thing.weight" in caplog.text and "NOT packed" in caplog.text
    with safe_open(out / "dense.safetensors", "pt") as f:
        assert "model.layers.0.some_new_thing.weight" not in f.keys()


def test_unknown_format_and_missing_shard(hf_tiny_mixtral_dir, ckpts, tmp_path):
    with pytest.raises(codec.CodecError, match="int3"):
        write_pack(hf_tiny_mixtral_dir, tmp_path / "p", formats=("int4", "int3"), progress=False)
    broken = _copy_checkpoint(ckpts["mixtral-sharded"], tmp_path / "sharded")
    next(broken.glob("model-*.safetensors")).unlink()
    with pytest.raises(PackError, match="lists shard .* missing"):
        write_pack(broken, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


# -- atomicity ------------------------------------------------------------------------------------


def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def test_failure_midway_leaves_nothing(hf_tiny_mixtral_dir, tmp_path, monkeypatch):
    out = tmp_path / "p"
    real, calls = codec.encode_expert, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return real(*a, **kw)

    monkeypatch.setattr(codec, "encode_expert", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_pack(hf_tiny_mixtral_dir, out, progress=False)
    assert not out.exists() and _leftovers(out) == []
    monkeypatch.setattr(codec, "encode_expert", real)
    with Pack.open(write_pack(hf_tiny_mixtral_dir, out, progress=False)) as pack:
        assert pack.verify() == []


def test_killed_pack_leaves_no_loadable_dir_and_next_pack_cleans_up(hf_tiny_mixtral_dir, tmp_path):
    out = tmp_path / "p"
    script = textwrap.dedent(f"""
        import os, signal
        from expert_store import codec, pack
        real, calls = codec.encode_expert, [0]
        def dying(*a, **kw):
            calls[0] += 1
            if calls[0] > 7:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no except, no finally
            return real(*a, **kw)
        codec.encode_expert = dying
        pack.write_pack({str(hf_tiny_mixtral_dir)!r}, {str(out)!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    (tmp,) = _leftovers(out)
    assert tmp.name.startswith(".p.tmp-")
    with pytest.raises(PackError, match="interrupted pack"):
        Pack.open(tmp)

    assert main(["pack", str(hf_tiny_mixtral_dir), str(out), "--formats", "int2", "--no-progress"]) == 0
    assert _leftovers(out) == []
    with Pack.open(out) as pack:
        assert pack.formats == ("int2",) and pack.verify() == []


def test_existing_out_dir_needs_force(hf_tiny_mixtral_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["pack", str(hf_tiny_mixtral_dir), str(out), "--formats", "int2", "--no-progress"]) == 0
    assert main(["pack", str(hf_tiny_mixtral_dir), str(out), "--formats", "int4", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0] and "--force" in err[0]
    with Pack.open(out) as pack:
        assert pack.formats == ("int2",)

    assert main(["pack", str(hf_tiny_mixtral_dir), str(out), "--formats", "int4", "--force", "--no-progress"]) == 0
    with Pack.open(out) as pack:
        assert pack.formats == ("int4",) and pack.verify() == []
    assert _leftovers(out) == []

    precious = tmp_path / "not-a-pack"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main(["pack", str(hf_tiny_mixtral_dir), str(precious), "--force", "--no-progress"]) == 2
    assert "not a pack" in capsys.readouterr().err
    assert (precious / "thesis.tex").exists()


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_describes_the_pack(packs, capsys):
    assert main(["inspect", str(packs["qwen2_moe"])]) == 0
    out = capsys.readouterr().out
    for text in ("qwen2_moe", "3 decoder layers, 2 MoE: [0, 2]", "8 per MoE layer", "top-2", "shared expert",
                 "bf16", "int8", "int4", "int2", "KiB per expert", "none (token ids only)"):
        assert text in out, text
