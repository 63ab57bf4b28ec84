"""benchmarks/convergence.py: a tiny DLA trained with accelerate() (backend triton, the fused kernels in Triton's
interpreter) follows the eager training of the same seed within the spread of two eager seeds, and learns."""
import collections
import json
import os
import sys

import pytest
import torch

from dla_fast import backend

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import convergence  # noqa: E402

TRITON_REASON = backend.unavailable_reason("triton")


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts of the Triton kernels launched (by name), through the interpreter's run."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = collections.Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run here: {TRITON_REASON}")
def test_fused_training_stays_within_the_eager_seed_spread(tmp_path, triton_launches):
    out = tmp_path / "convergence.json"
    status = convergence.main(["--device", "cpu", "--json", str(out)])  # the CPU defaults: tiny DLA, 8 steps
    report = json.loads(out.read_text())
    assert report["config"]["backend"] == "triton" and report["config"]["model"] == "tiny"
    steps = report["config"]["steps"]
    assert all(len(curve) == steps for curve in report["curves"].values())
    assert report["learned"], (report["first_window_loss"], report["last_window_loss"])
    assert report["within_spread"], (report["max_gap"], report["seed_spread"])
    assert status == 0 and report["passed"]
    # the accelerated run did run the fused kernels, every step: the roots (5 in the tiny DLA) forward and
    # backward, the blocks' BatchNorm + ReLU forward and backward
    for kernel in ("aggregate_fwd_kernel", "aggregate_grad_input_kernel", "aggregate_grad_weight_kernel"):
        assert triton_launches[kernel] == 5 * steps, kernel
    for kernel in ("bn_apply_kernel", "bn_backward_apply_kernel", "channel_stats_partial_kernel"):
        assert triton_launches[kernel] >= 20 * steps, kernel


def test_the_statistic():
    """Smoothed over the window, the largest |difference| of two curves; pass = within the seed spread and
    learned (last window at most `learned` x the first)."""
    assert convergence.smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    curves = {"eager": [4.0, 3.0, 2.0, 1.0], "dla_fast": [4.0, 3.0, 2.0, 1.5], "eager_seed1": [5.0, 4.0, 2.0, 1.0]}
    numbers, passed = convergence.verdict(curves, window=2, learned=0.5)
    assert numbers["max_gap"] == pytest.approx(0.25) and numbers["seed_spread"] == pytest.approx(1.0)
    assert numbers["learned"] and passed  # (2 + 1) / 2 = 1.5 <= 0.5 * (4 + 3) / 2
    curves["dla_fast"] = [4.0, 3.0, 3.0, 3.0]
    assert not convergence.verdict(curves, window=2, learned=0.5)[1]  # gap 1.5 > spread 1.0
    flat = {name: [2.0, 2.0, 2.0, 2.0] for name in curves}
    assert not convergence.verdict(flat, window=2, learned=0.5)[1]  # within the spread, but nothing learned


def test_centernet_task_targets_and_loss():
    """The GPU task's data (squares, CenterNet targets at stride 4) and loss: a prediction of the targets scores
    lower than a random one."""
    images, (hm, wh, reg, mask) = convergence.make_detection(classes=3, size=64, samples=4, noise=0.1, seed=0)
    assert images.shape == (4, 3, 64, 64) and hm.shape == (4, 3, 16, 16) and mask.shape == (4, 16, 16)
    centres = mask.bool()
    assert 4 <= int(centres.sum()) <= 12                                  # 1-3 squares per image
    assert torch.equal(hm.amax(1)[centres], torch.ones(int(centres.sum())))  # a peak of 1 at every centre
    assert (wh[:, 0][centres] > 0).all() and ((reg >= 0) & (reg < 1)).all()
    exact = [{"hm": torch.logit(hm.clamp(1e-4, 1 - 1e-4)), "wh": wh, "reg": reg}]
    random = [{"hm": torch.randn_like(hm), "wh": torch.randn_like(wh), "reg": torch.randn_like(reg)}]
    targets = (hm, wh, reg, mask)
    assert convergence.centernet_loss(exact, targets) < convergence.centernet_loss(random, targets)
