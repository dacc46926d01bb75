"""`python -m bench.families [--out DIR]`: figures for the DeepSeek-V2/V3, GLM-4.5 and gpt-oss families on
the tiny random checkpoints the parity tests use (tests/gpu_worker/hf_models.py), printed as a table.

Per case: logit parity with transformers (max |diff| / max |logit| on a 24-token prompt, bf16 pack,
fp32 compute), pack time and size (bf16 + int4), KV-cache bytes per token (MLA against the same model
with plain multi-head attention), and the cross_layer predictor's strict top-k accuracy (layer l + 1's
router on layer l's gate input; exact set match of the top-k) next to a uniformly random predictor,
over 8 prompts x (24 prompt + 24 greedy tokens). Random weights route nearly uniformly, so these
accuracies say the predictor runs on every family, not how well it predicts a trained model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from expert_store.pack import write_pack
from expert_store.packfile import Pack
from gpu_worker.generate import SamplingParams, generate
from gpu_worker.predictors import CrossLayerPredictor, RandomPredictor
from gpu_worker.runtime import load_local
from tests.gpu_worker.hf_models import build_hf_checkpoint

CASES = ("deepseek_v2", "deepseek_v2_q_lora", "deepseek_v3", "glm4_moe", "gpt_oss")


class AccuracyObserver:
    """Predicts each MoE layer's top-k from the previous MoE layer's gate input; counts exact matches."""

    def __init__(self, model, seed: int = 0):
        a = model.args
        self.moe = list(a.moe_layers)
        self.top_k = a.top_k
        self.cross = CrossLayerPredictor([model.layers[i].router for i in self.moe])
        self.random = RandomPredictor(a.num_experts, seed)
        self.pending: dict[int, tuple[list[list[int]], list[list[int]]]] = {}
        self.total = self.cross_exact = self.random_exact = 0
        self.usage = torch.zeros(len(self.moe), model.args.num_experts)  # token assignments per layer

    def on_gate_input(self, layer: int, gate_input: torch.Tensor) -> None:
        m = self.moe.index(layer)
        if m + 1 < len(self.moe):
            rows = list(range(gate_input.shape[0]))
            self.pending[m + 1] = (self.cross.predict(m + 1, rows, self.top_k, gate_input),
                                   self.random.predict(m + 1, rows, self.top_k))

    def on_routing(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        m = self.moe.index(layer)
        self.usage[m] += torch.bincount(expert_ids.reshape(-1).cpu(), minlength=self.usage.shape[1])
        preds = self.pending.pop(m, None)
        if preds is None:
            return
        for row, cross, rand in zip(expert_ids.tolist(), *preds):
            self.total += 1
            self.cross_exact += set(cross) == set(row)
            self.random_exact += set(rand) == set(row)


def measure(case: str, root: Path) -> dict:
    hf = build_hf_checkpoint(case, root / "ckpt")
    t0 = time.perf_counter()
    write_pack(root / "ckpt", root / "pack", formats=("bf16", "int4"), progress=False)
    pack_s = time.perf_counter() - t0
    with Pack.open(root / "pack") as p:
        sizes = {f: p.expert_nbytes(f) * len(p.expert_ids) for f in p.formats}
        dense_bytes = (root / "pack" / "dense.safetensors").stat().st_size
    rt = load_local(root / "pack", fmt="bf16", device="cpu", form="fp32")
    a = rt.model.args
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, a.vocab_size, (24,), generator=g).tolist() for _ in range(8)]
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[0]])).logits[0]
    ours = rt.model.forward([rt.model.new_sequence()], [torch.tensor(prompts[0])], all_logits=True)
    parity = float((ours - ref).abs().max() / ref.abs().max())
    obs = AccuracyObserver(rt.model)
    rt.model.observer = obs
    for prompt in prompts:
        list(generate(rt.model, prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)))
    plain = dataclasses.replace(a, attention="gqa", num_kv_heads=a.num_heads)
    return {
        "case": case, "family": a.family, "experts": f"{a.num_moe_layers}x{a.num_experts} top-{a.top_k}",
        "parity": parity, "pack_s": pack_s, "bf16_expert_bytes": sizes["bf16"], "int4_expert_bytes": sizes["int4"],
        "dense_bytes": dense_bytes, "kv_bytes_per_token": a.kv_bytes_per_token(),
        "kv_bytes_per_token_plain": plain.kv_bytes_per_token() if a.attention == "mla" else None,
        "predictions": obs.total, "cross_layer_strict": obs.cross_exact / max(1, obs.total),
        "random_strict": obs.random_exact / max(1, obs.total),
        "usage_entropy": usage_entropy(obs.usage),
    }


def usage_entropy(usage: torch.Tensor) -> float:
    """Mean over layers of the entropy of expert usage / log E (1.0: perfectly uniform routing)."""
    p = usage / usage.sum(dim=1, keepdim=True)
    ent = -(p * p.clamp(min=1e-12).log()).sum(dim=1) / torch.log(torch.tensor(float(usage.shape[1])))
    return float(ent.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            (Path(tmp) / case).mkdir()
            rows.append(measure(case, Path(tmp) / case))
    print("| case | experts | logit parity | pack s | bf16 / int4 experts KiB | dense KiB | KV B/token (plain MHA) "
          "| cross_layer strict top-k | random | usage entropy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kv = f"{r['kv_bytes_per_token']}" + (f" ({r['kv_bytes_per_token_plain']})" if r["kv_bytes_per_token_plain"] else "")
        print(f"| {r['case']} | {r['experts']} | {r['parity']:.1e} | {r['pack_s']:.2f} | "
              f"{r['bf16_expert_bytes'] / 1024:.0f} / {r['int4_expert_bytes'] / 1024:.0f} | {r['dense_bytes'] / 1024:.0f} "
              f"| {kv} | {r['cross_layer_strict']:.3f} ({r['predictions']} rows) | {r['random_strict']:.3f} "
              f"| {r['usage_entropy']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
