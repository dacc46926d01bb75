"""Shared fixtures: ../shared (beside the repo), packs built once per session, and running store and worker
processes (running_store, running_worker) started by their command lines."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from client.processes import Service, ServiceError, module_command

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FATE_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: CI runs with ../shared beside the repo (or set FATE_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_mixtral_dir(shared_dir) -> Path:
    return shared_dir / "models" / "tiny-mixtral"


@pytest.fixture(scope="session")
def tiny_mixtral_pack(tiny_mixtral_dir, tmp_path_factory) -> Path:
    """tiny-mixtral packed once with every format."""
    from expert_store.pack import write_pack

    out = tmp_path_factory.mktemp("packs") / "tiny-mixtral"
    write_pack(tiny_mixtral_dir, out, formats=("bf16", "int8", "int4", "int2"), progress=False)
    return out


# -- tiny random Hugging Face checkpoints, saved by transformers itself (pack tests) ---------------


def _save_tiny_hf(family: str, out: Path, **kw) -> Path:
    """A random model saved in bf16, so that a bf16 pack must reproduce it bit for bit."""
    import torch
    import transformers

    cfg_cls, model_cls = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    }[family]
    cfg = cfg_cls(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    model_cls(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_tiny_mixtral_dir(tmp_path_factory) -> Path:
    """Mixtral, 2 layers x 8 experts (hidden 64, expert FFN 64), bf16, with a tiny tokenizer.json."""
    from tokenizers import Tokenizer, models

    out = _save_tiny_hf("mixtral", tmp_path_factory.mktemp("hf") / "tiny-mixtral", intermediate_size=64,
                        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def hf_tiny_qwen2_moe_dir(tmp_path_factory) -> Path:
    """Qwen2-MoE, 3 layers with layer 1 dense (mlp_only_layers), a shared expert, bf16, no tokenizer."""
    return _save_tiny_hf("qwen2_moe", tmp_path_factory.mktemp("hf") / "tiny-qwen2-moe", num_hidden_layers=3,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                         shared_expert_intermediate_size=48, mlp_only_layers=[1])


# -- server processes started by their command lines (client.processes) -------------------------------


def shm_segments_of(pid: int) -> list[str]:
    """The store's shared-memory segments still in /dev/shm (its names start fate-moe-<pid>-)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"fate-moe-{pid}-")]


class Processes:
    """The store and worker processes of a test: started by their command lines, waited for until
    SERVING, stopped with SIGTERM (SIGKILL and a failure when one does not exit in time). A failure
    shows the process's output."""

    def __init__(self, root: Path):
        self.root = root
        self.services: dict[str, Service] = {}
        self.addresses: dict[str, str] = {}

    def start(self, name: str, cmd: list[str], address: str) -> Service:
        svc = Service(name, cmd, self.root / f"{name}.log")
        self.services[name], self.addresses[name] = svc, address
        return svc

    def start_store(self, pack: Path, name: str = "store", *flags: str) -> str:
        """A store serving the pack's int4 experts on a unix socket; its address."""
        address = f"unix:{self.root}/{name}.sock"
        self.start(name, module_command("expert_store", "serve", pack, "--listen", address, "--formats", "int4",
                                        "--grace-s", "2", *flags), address)
        return address

    def start_worker(self, store: str, name: str = "worker", *flags: str) -> str:
        """A CPU worker running int4 experts from `store` on a unix socket; its address."""
        address = f"unix:{self.root}/{name}.sock"
        self.start(name, module_command("gpu_worker", "serve", "--store", store, "--listen", address, "--device",
                                        "cpu", "--format", "int4", *flags), address)
        return address

    def wait(self, *names: str, timeout_s: float = 120.0) -> None:
        for name in names:
            try:
                self.services[name].wait_serving(self.addresses[name], timeout_s)
            except ServiceError as e:
                pytest.fail(f"{e}\n{self.services[name].tail(60)}")

    def stop(self, name: str, timeout_s: float = 60.0) -> int:
        svc = self.services[name]
        running = svc.proc.poll() is None
        rc = svc.stop(timeout_s)
        if running and rc == -signal.SIGKILL:
            pytest.fail(f"the {name} did not exit within {timeout_s:.0f} s of SIGTERM:\n{svc.tail(60)}")
        return rc

    def stop_all(self) -> dict[str, int]:
        """Stop every process, the last started first (workers before their store); their exit statuses."""
        return {name: self.stop(name) for name in reversed(list(self.services))}

    def output(self, name: str) -> str:
        return self.services[name].output()[-3000:]


@pytest.fixture(scope="module")
def sock_dir():
    d = Path(tempfile.mkdtemp(prefix="fm-"))  # short: unix socket paths are limited to ~100 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def module_processes(sock_dir):
    """Processes shared by a test module; at its end each must exit 0 on SIGTERM and stores leave no segment."""
    procs = Processes(sock_dir)
    try:
        yield procs
    finally:
        rcs = procs.stop_all()
        assert rcs == {name: 0 for name in rcs}, {n: procs.output(n) for n in rcs if rcs[n]}
        for name, svc in procs.services.items():
            assert shm_segments_of(svc.pid) == [], name


@pytest.fixture(scope="module")
def int4_expert_bytes(tiny_mixtral_pack) -> int:
    """Bytes of every int4 expert of tiny-mixtral."""
    from expert_store.packfile import Pack

    with Pack.open(tiny_mixtral_pack) as p:
        return p.expert_nbytes("int4") * len(p.expert_ids)


@pytest.fixture(scope="module")
def running_store(module_processes, tiny_mixtral_pack, int4_expert_bytes) -> str:
    """A store serving tiny-mixtral's int4 experts, RAM tier half of them; its address."""
    address = module_processes.start_store(tiny_mixtral_pack, "store", "--ram-bytes", str(int4_expert_bytes // 2))
    module_processes.wait("store")
    return address


@pytest.fixture(scope="module")
def running_worker(module_processes, running_store):
    """start(name, *flags, wait=True) -> address: a worker on running_store (stopped at the module's end)."""
    def start(name: str, *flags: str, wait: bool = True) -> str:
        address = module_processes.start_worker(running_store, name, *flags)
        if wait:
            module_processes.wait(name)
        return address

    return start
