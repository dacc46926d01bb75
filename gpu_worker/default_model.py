"""The built-in default model: a tiny RANDOM-weight Mixtral checkpoint made on the spot.

A fresh machine has no model and no network to fetch one, yet the README's run
command must work there. This module writes a small checkpoint in Hugging Face
layout (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json) that the packer and the runtime read like any other.
Its weights are random, so it routes almost uniformly and its text is noise:
it exercises the machinery, not the model. Use ../shared/models/tiny-mixtral
or a real checkpoint for anything that needs meaning.

It needs no transformers (a test-only dependency): the tensors come from
torch's seeded generator and the tokenizer is a byte-level BPE trained with
`tokenizers` on the small English corpus below.

    python -m gpu_worker make-default-model CACHE_DIR   # make (or reuse) it, print its path
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from expert_store import hf_names
from expert_store.errors import FateError
from expert_store.model_args import ModelArgs

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_MODEL_VERSION = 1  # bump when the output changes, so caches made by older code are not reused
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<unk>")  # ids 0, 1, 2
TOKENIZER_VOCAB_SIZE = 768
INIT_STD = 0.02
MARKER_FILE = "fate-moe-default.json"  # written last: its presence means the checkpoint is complete

RANDOM_WEIGHTS_NOTICE = (
    "note: the default model has RANDOM weights (made on this machine, not trained): "
    "generated text is noise. Pass a real checkpoint, e.g. ../shared/models/tiny-mixtral, for meaningful text."
)

_ARCH = {
    "num_hidden_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
}

# Small and varied on purpose: enough words for ~500 merges of byte-level BPE.
_CORPUS = """\
A mixture of experts replaces the single feed-forward block of a transformer layer with many smaller
blocks, the experts, and a router that sends each token to a few of them. The model keeps a large
number of parameters, but every token touches only a small part of them, so the cost of one step stays
close to that of a much smaller dense model.
The difficulty is memory. All experts must live somewhere, and a small accelerator holds only a
fraction of them. The rest wait in host memory or on a solid state disk, and they have to be copied
to the device before a token can use them. Copying is slow compared with computing, so a careless
system spends most of its time waiting for weights to arrive.
Three ideas help. First, predict which experts the next layer will need while the current layer is
still running, and start the copy early. Second, keep the experts that are used most often, and
give the shallow layers more room because their choices are harder to guess. Third, move fewer bytes:
store each expert with four or two bits per weight, with a scale and a zero point for every group.
The expert store is a long-lived process. It reads the packed checkpoint once, checks every checksum,
and serves experts to the workers over a socket or through shared memory on the same machine. The
worker asks for what it needs, keeps a budget that it never exceeds, and streams tokens to the client.
When the budget is small, the hit rate falls and the worker stalls; when the predictor is good, the
copies finish before the layer that needs them starts, and the stall disappears.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly. Pack my box with
five dozen liquor jugs. How vexingly quick daft zebras jump!
In the morning the harbour was quiet. Fishing boats came back one after another, and the gulls
followed them in wide circles, calling over the water. An old man sat on the wall, mending a net
with slow and patient hands. He had done this every day for forty years, and he said that the sea
had taught him everything he knew about waiting.
The library opened at nine. Students carried their books to the long tables under the windows,
where the light was best, and the room filled with the sound of pages turning. Somebody coughed,
somebody laughed quietly, and the clock above the door counted the hours of the afternoon.
To make bread, mix flour, water, salt and a little yeast. Knead the dough for ten minutes, until it
is smooth and elastic, then let it rise in a warm place for an hour. Shape the loaf, let it rise
again, and bake it in a hot oven until the crust is brown and the bottom sounds hollow when tapped.
Rain fell on the city all night. In the streets the lamps made yellow circles on the wet stones,
and the few people who were still out walked fast, with their collars turned up against the wind.
By morning the clouds had gone, and the river shone under a clean blue sky.
A good test is small, fast and honest. It checks one thing, it fails for one reason, and its message
says what went wrong and what to do about it. A test that passes whatever the code does is worse
than no test at all, because it gives a confidence that nobody has earned.
Numbers, dates and names: one, two, three, four, five, six, seven, eight, nine, ten, twenty, fifty,
one hundred, one thousand. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January,
February, March, April, May, June, July, August, September, October, November, December.
The system prints a line for every step: the checkpoint, the pack, the model on the device, the
prompt, the tokens as they come, and at the end the number of cache hits and misses, the bytes that
were fetched, and the time spent waiting. If something fails, the error says which file or which
setting was wrong, and how to fix it.
"""


class DefaultModelError(FateError, RuntimeError):
    """The default checkpoint could not be made or a cached one is unusable (says where and what to do)."""


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE over the built-in corpus; specials first, so <s>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> needed
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def make_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """config.json for the default architecture (Mixtral layout, written the transformers-4 way)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        **_ARCH,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Mixtral checkpoint with these args (names from hf_names)."""
    h, hd, inter = args.hidden_size, args.head_dim, args.expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        hf_names.embed_tokens(): (args.vocab_size, h),
        hf_names.final_norm(): (h,),
    }
    if not args.tie_word_embeddings:
        shapes[hf_names.lm_head()] = (args.vocab_size, h)
    attn_shapes = {
        "input_norm": (h,),
        "post_attention_norm": (h,),
        "q": (args.num_heads * hd, h),
        "k": (args.num_kv_heads * hd, h),
        "v": (args.num_kv_heads * hd, h),
        "o": (h, args.num_heads * hd),
    }
    expert_shapes = {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    for layer in range(args.num_layers):
        for role, name in hf_names.attention(args, layer).items():
            shapes[name] = attn_shapes[role]
        shapes[hf_names.router(args, layer)] = (args.num_experts, h)
        for e in range(args.num_experts):
            for role, name in hf_names.expert(args, layer, e).items():
                shapes[name] = expert_shapes[role]
    expected = set(hf_names.dense_tensor_names(args)) | set(hf_names.expert_tensor_names(args))
    if set(shapes) != expected:
        raise DefaultModelError(
            f"default model and hf_names disagree: missing {sorted(expected - set(shapes))[:5]}, "
            f"extra {sorted(set(shapes) - expected)[:5]}"
        )
    return shapes


def _tensor_seed(seed: int, name: str) -> int:
    """One seed per tensor, so each tensor's values depend only on (seed, name), not on order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def make_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Normal(0, INIT_STD) matrices and all-ones norm weights, in bf16, deterministic from `seed`."""
    weights = {}
    for name, shape in tensor_shapes(args).items():
        if len(shape) == 1:  # RMSNorm weights
            weights[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
        weights[name] = (torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD).to(torch.bfloat16)
    return weights


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.iterdir()):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_into(out: Path, seed: int) -> None:
    tok = train_tokenizer()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    cfg = make_config(tok.get_vocab_size(), bos, eos)
    args = ModelArgs.from_hf_config(cfg, source="default model config")
    save_file(make_weights(args, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False})
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": cfg["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    (out / "README.md").write_text(f"# fate-moe default model (random weights)\n\n{RANDOM_WEIGHTS_NOTICE}\n")
    for p in out.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; a checkpoint is meant to be read by other users' services
    files = sorted(p.name for p in out.iterdir())
    _write_json(
        out / MARKER_FILE,
        {"version": DEFAULT_MODEL_VERSION, "seed": seed, "files": {n: (out / n).stat().st_size for n in files}},
    )


def create_default_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write the default checkpoint to `path` (which must not exist) atomically: all files go to a
    temporary sibling directory that is renamed into place, so `path` is either absent or complete."""
    path = Path(path)
    if path.exists():
        raise DefaultModelError(f"{path} already exists: remove it, or use ensure_default_checkpoint to reuse it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_into(tmp, seed)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _fsync_tree(tmp)
        os.rename(tmp, path)  # fails if another process renamed its copy into place first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_complete(path: Path, seed: int | None = None) -> bool:
    """True for a checkpoint written by this version of the module (and this seed, when given)."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if marker.get("version") != DEFAULT_MODEL_VERSION or (seed is not None and marker.get("seed") != seed):
        return False
    files = marker.get("files", {})
    return all((path / n).is_file() and (path / n).stat().st_size == size for n, size in files.items())


def ensure_default_checkpoint(
    cache_dir: str | Path, seed: int = 0, log: Callable[[str], None] | None = print
) -> Path:
    """The default checkpoint under cache_dir: reused when a complete one is there, made otherwise.
    Logs (prints) the random-weights notice either way."""
    root = Path(cache_dir)
    path = root / f"default-mixtral-v{DEFAULT_MODEL_VERSION}-seed{seed}"
    if is_complete(path, seed):
        if log:
            log(f"default model: reusing {path}")
    else:
        if path.exists():  # not ours or damaged by hand: our writer never leaves a partial one here
            if log:
                log(f"default model: {path} is incomplete; rebuilding it")
            shutil.rmtree(path)
        if log:
            log(f"default model: writing a tiny random-weight Mixtral to {path}")
        try:
            create_default_checkpoint(path, seed)
        except (OSError, DefaultModelError):
            if not is_complete(path, seed):  # lost a race to a concurrent writer only if theirs is complete
                raise
    if log:
        log(RANDOM_WEIGHTS_NOTICE)
    return path
