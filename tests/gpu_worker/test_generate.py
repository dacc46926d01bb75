"""Sampling: greedy, temperature, top-k, top-p, seeds, stops and parameter checks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gpu_worker.generate import SamplingError, SamplingParams, generate, make_generator, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def draw(params: SamplingParams, n: int = 3000) -> Counter:
    g = make_generator(params)
    return Counter(sample(LOGITS, params, g) for _ in range(n))


def test_greedy_and_top_k_one_take_the_argmax():
    assert sample(LOGITS, SamplingParams()) == 0
    assert set(draw(SamplingParams(temperature=1.0, top_k=1, seed=0), 50)) == {0}


def test_top_k_restricts_support_and_keeps_proportions():
    c = draw(SamplingParams(temperature=1.0, top_k=2, seed=1))
    assert set(c) == {0, 1}
    expected = float(torch.softmax(LOGITS[:2], 0)[0])  # 0.73
    assert c[0] / 3000 == pytest.approx(expected, abs=0.04)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS, 0)  # 0.57, 0.21, 0.13, 0.08, 0.03
    p = float(probs[0] + probs[1]) - 1e-3  # needs tokens 0 and 1 to reach p
    assert set(draw(SamplingParams(temperature=1.0, top_p=p, seed=2))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.05, seed=2), 200)) == {0}


def test_temperature_flattens_the_distribution():
    cold = draw(SamplingParams(temperature=0.3, seed=3))
    hot = draw(SamplingParams(temperature=3.0, seed=3))
    assert cold[0] > hot[0] and len(hot) == 5


def test_same_seed_same_draws_different_seed_differs():
    g = make_generator(SamplingParams(seed=7))
    a = [sample(LOGITS, SamplingParams(temperature=2.0), g) for _ in range(40)]
    g = make_generator(SamplingParams(seed=7))
    b = [sample(LOGITS, SamplingParams(temperature=2.0), g) for _ in range(40)]
    g = make_generator(SamplingParams(seed=8))
    c = [sample(LOGITS, SamplingParams(temperature=2.0), g) for _ in range(40)]
    assert a == b and a != c


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-2),
    dict(top_p=0.0), dict(top_p=1.5),
])
def test_bad_parameters_are_rejected(bad):
    with pytest.raises(SamplingError):
        SamplingParams(**bad).validate()


class _ScriptedModel:
    """A stand-in model whose next token is scripted, to test the loop's stopping rules."""

    def __init__(self, script, eos=(1,), ctx=100):
        from types import SimpleNamespace

        self.args = SimpleNamespace(eos_token_ids=eos, max_position_embeddings=ctx)
        self.script = list(script)
        self.calls = 0

    def new_sequence(self, capacity):
        return object()

    def forward(self, seqs, tokens):
        logits = torch.zeros(1, 10)
        logits[0, self.script[self.calls]] = 1.0
        self.calls += 1
        return logits


def test_stops_on_eos_stop_ids_and_max_tokens():
    assert list(generate(_ScriptedModel([4, 5, 1, 6]), [3], SamplingParams(max_new_tokens=10))) == [4, 5, 1]
    assert list(generate(_ScriptedModel([4, 5, 1, 6]), [3], SamplingParams(max_new_tokens=4, ignore_eos=True))) == [4, 5, 1, 6]
    assert list(generate(_ScriptedModel([4, 5, 6]), [3], SamplingParams(max_new_tokens=10, stop_token_ids=(5,)))) == [4, 5]
    m = _ScriptedModel([4, 5, 6, 7])
    assert list(generate(m, [3], SamplingParams(max_new_tokens=2))) == [4, 5]
    assert m.calls == 2  # no forward for a token that is never emitted


def test_empty_prompt_and_context_overflow():
    with pytest.raises(SamplingError, match="empty"):
        list(generate(_ScriptedModel([4]), [], SamplingParams()))
    with pytest.raises(SamplingError, match="exceeds the context"):
        list(generate(_ScriptedModel([4], ctx=10), [3] * 8, SamplingParams(max_new_tokens=5)))
