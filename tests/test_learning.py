"""GRPO learns, not only runs: a bandit with a known optimum, the KL leash, a reduced demo.

The bandit: a policy over 4 tokens (logits, no context) writes a one-token completion padded
to 3 positions; the reward is 1 when the token is 2, else 0. The optimum is "always 2", and
from uniform logits P(2) starts at 0.25. Each step samples 4 groups of 8, computes group
advantages, and takes 2 passes over the rollout with `grpo_loss` (so the second pass sees a
ratio != 1 and the clipping). The padded positions carry the policy's real, differentiable
log-prob of the pad token, so a loss that read the padding instead of the choice would get
no signal (group advantages sum to 0), and one that flipped the advantage or the ratio would
push P(2) down: each of those bugs fails `test_bandit_learns_the_rewarded_token`, and
`test_bandit_test_fails_when_a_bug_is_planted` plants each one to show it (P(2) ends at 0.01
with a flipped advantage or an inverted ratio, and stays at 0.25 with the mask on the padding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from safegrpo_pl.rl.grpo import group_advantages, grpo_loss

VOCAB = 4
REWARDED = 2
PAD = 3
WIDTH = 3  # the choice, then 2 padded positions
NUM_GROUPS = 4
GROUP_SIZE = 8


def _token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """(N, WIDTH) log-probs of `ids` under the context-free policy `logits` (V,)."""
    return torch.log_softmax(logits, -1)[ids]


def _exact_kl(logits: Tensor, ref_logits: Tensor) -> float:
    """KL(pi || pi_ref) summed over the 4 tokens (exact, not estimated)."""
    logp, ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    return float((logp.exp() * (logp - ref)).sum())


BUGS = ("flipped_advantage", "inverted_ratio", "mask_on_padding")


def train_bandit(
    steps: int,
    *,
    kl_coef: float = 0.0,
    lr: float = 0.5,
    seed: int = 0,
    num_iterations: int = 2,
    bug: str | None = None,
) -> tuple[list[float], Tensor]:
    """Run GRPO on the bandit; returns P(rewarded token) before each step and at the end,
    and the final logits. `bug` plants one of `BUGS` in the loop, to show the test catches it."""
    logits = torch.zeros(VOCAB, requires_grad=True)
    ref_logits = logits.detach().clone()
    optimizer = torch.optim.SGD([logits], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    num_rows = NUM_GROUPS * GROUP_SIZE
    history = []
    for _ in range(steps):
        probs = torch.softmax(logits.detach(), -1)
        history.append(float(probs[REWARDED]))
        choice = torch.multinomial(probs, num_rows, replacement=True, generator=generator)
        ids = torch.full((num_rows, WIDTH), PAD)  # (N, WIDTH)
        ids[:, 0] = choice
        mask = torch.zeros(num_rows, WIDTH)
        mask[:, 0] = 1.0
        if bug == "mask_on_padding":
            mask = 1.0 - mask
        rewards = (choice == REWARDED).float()  # (N,)
        advantages = group_advantages(rewards, GROUP_SIZE)  # (N,)
        if bug == "flipped_advantage":
            advantages = -advantages
        old_logp = _token_logprobs(logits, ids).detach()  # the sampling policy, kept
        ref_logp = _token_logprobs(ref_logits, ids) if kl_coef > 0 else None
        for _ in range(num_iterations):
            logp = _token_logprobs(logits, ids)
            if bug == "inverted_ratio":  # ratio = exp(old - new) instead of exp(new - old)
                logp = 2 * old_logp - logp
            loss, _ = grpo_loss(logp, old_logp, ref_logp, advantages, mask, kl_coef=kl_coef)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    history.append(float(torch.softmax(logits.detach(), -1)[REWARDED]))
    return history, logits.detach()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bandit_learns_the_rewarded_token(seed):
    history, _ = train_bandit(40, seed=seed)
    # Uniform logits: P(2) = 1/4 at the start.
    assert history[0] == pytest.approx(0.25, abs=1e-6)
    assert history[-1] > 0.9, (
        f"seed {seed}: P(rewarded token) went {history[0]:.2f} -> {history[-1]:.2f} in 40 GRPO "
        "steps; expected > 0.9: the advantage's sign, the ratio or the mask is wrong"
    )


@pytest.mark.parametrize("bug", BUGS)
def test_bandit_test_fails_when_a_bug_is_planted(bug):
    history, _ = train_bandit(40, bug=bug)
    # The threshold of `test_bandit_learns_the_rewarded_token` is 0.9; a planted bug must land
    # far below it, not near it, or the test would only catch it by luck.
    assert history[-1] < 0.5, f"with {bug}, P(rewarded token) still rose to {history[-1]:.2f}"


def test_large_kl_coef_keeps_the_policy_near_the_reference():
    _, free = train_bandit(60, kl_coef=0.0)
    _, leashed = train_bandit(60, kl_coef=2.0)
    reference = torch.zeros(VOCAB)
    kl_free, kl_leashed = _exact_kl(free, reference), _exact_kl(leashed, reference)
    # Without the KL term the policy heads for "always 2": KL -> log(1 / 0.25) = 1.386 nats.
    assert kl_free > 1.0, f"kl_coef=0 moved the policy only KL={kl_free:.3f} from the reference"
    # With kl_coef=2 the pull back balances the reward's push near KL ~ 0.1 (measured 0.108).
    assert kl_leashed < 0.2, (
        f"kl_coef=2 ended at KL={kl_leashed:.3f} from the reference (kl_coef=0: {kl_free:.3f}); "
        "expected the KL term to hold the policy near the reference"
    )


# -- the demo, reduced ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
REDUCED_STEPS = 80


@pytest.mark.slow
def test_reduced_demo_raises_the_held_out_reward(tmp_path):
    """`configs/tiny.yaml` through the real CLI, shortened: warm-up, then 80 GRPO steps at a
    constant lr on 256 records; the greedy reward on 64 held-out records must rise by 0.3.

    The start is the warmed-up greedy policy, which helps with everything and gets the combined
    tag right by chance (reward 0.166 here), so the warm-up alone cannot pass this test.
    Measured on this 2-core CPU, one thread: 0.166 -> 0.518 at 80 steps (217 s on a loaded
    machine), 0.166 -> 0.582 at 120; at 60 steps the rise was only ~0.2, too close to any
    margin. Halving the prompts per step instead (batch 16, 120 steps) reached 0.453.
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [
        sys.executable,
        "-m",
        "safegrpo_pl",
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.max_steps",
        str(REDUCED_STEPS),
        "--model.lr_decay",
        "constant",  # a cosine decay over 80 steps would spend half of them at a tiny lr
        "--trainer.val_check_interval",
        "1000",  # no intermediate validation: before/after only
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.demo.num_train",
        "256",
        "--data.demo.num_val",
        "64",
        "--data.demo.num_test",
        "8",
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_file,) = tmp_path.glob("**/summary.json")
    summary = json.loads(summary_file.read_text())
    before, after = summary["before"]["mean_reward"], summary["after"]["mean_reward"]
    print(f"reduced demo: held-out mean reward {before:.3f} -> {after:.3f}")
    assert after - before > 0.3, (
        f"held-out mean reward went {before:.3f} -> {after:.3f} in {REDUCED_STEPS} GRPO steps; "
        "expected a rise of more than 0.3"
    )
    assert summary["after"]["format_rate"] > 0.9
