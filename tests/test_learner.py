"""The learner: lr schedule over EKIPL steps, equal work on every rank under ZeRO-3, the offloaded reference,
and the behaviour log-probs that expert_mode="is" and tis_cap need but API experts do not give."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ekipl.learner as learner_module
from ekipl.learner import Learner, OptimConfig
from ekipl.models import load_policy
from ekipl_kernels import LossConfig
from fakes.learner_setup import ds_config, join_process_group, make_sequences

TESTS = Path(__file__).resolve().parent


def make_learner(model_dir, processor, *, loss=LossConfig(), stage=0, max_steps=4, **kwargs):
    join_process_group()
    optim_keys = {k: kwargs.pop(k) for k in list(kwargs) if k in OptimConfig.__dataclass_fields__}
    return Learner(load_policy(model_dir), loss=loss, optim=OptimConfig(**{"lr": 1e-3, **optim_keys}),
                   ds_config=ds_config(stage), max_steps=max_steps, pad_id=processor.tokenizer.pad_token_id, **kwargs)


# -- 12.2: the schedule counts EKIPL steps ---------------------------------------------------------------------
def test_the_schedule_counts_ekipl_steps_however_many_optimiser_steps_each_takes(tiny_model_dir, processor):
    # 2 sequences, mini-batches of 1, 2 epochs: 4 optimiser steps per EKIPL step
    learner = make_learner(tiny_model_dir, processor, max_steps=5, warmup_steps=2, min_lr_ratio=0.1, ppo_epochs=2,
                           mini_batch_size=1, micro_batch_size=1)
    batch = learner.pack(make_sequences(processor, 2, seed=0))
    # step s < warmup trains at (s + 1) / warmup; then the cosine runs over the 3 remaining steps, its floor
    # (min_lr_ratio) reached at step max_steps, just after the last one
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)) for progress in (0.0, 1 / 3, 2 / 3, 1.0)]
    expected = [1e-3 * f for f in [0.5, 1.0, *cosine]]
    seen = []
    for step in range(5):
        learner.fill_logprobs(batch, old=True)
        seen.append(learner.update(batch)["lr"])
        # what the optimiser uses next: DeepSpeed's calls after each of the 4 optimiser steps did not move it
        assert learner.engine.get_lr()[0] == pytest.approx(expected[step + 1], rel=1e-6)
    assert seen == pytest.approx(expected[:5], rel=1e-6)
    assert seen[2] == pytest.approx(1e-3) and seen[4] > 2e-4  # the decay neither starts nor ends early


def test_a_constant_schedule_warms_up_the_same_way(tiny_model_dir, processor):
    learner = make_learner(tiny_model_dir, processor, max_steps=3, warmup_steps=2, schedule="constant", ppo_epochs=2,
                           micro_batch_size=2)
    batch = learner.pack(make_sequences(processor, 2, seed=0))
    seen = []
    for _ in range(3):
        learner.fill_logprobs(batch, old=True)
        seen.append(learner.update(batch)["lr"])
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3], rel=1e-6)


# -- the packed batch: made once per step, log-probs written into it on the learner's device --------------------
def test_fill_logprobs_writes_into_the_packed_batch_whose_slices_are_views(tiny_model_dir, processor):
    learner = make_learner(tiny_model_dir, processor, loss=LossConfig(beta=0.04), micro_batch_size=2)
    seqs = make_sequences(processor, 5, seed=4)
    batch = learner.pack(seqs)
    assert batch.old_logprobs is None and batch.ref_logprobs is None
    learner.fill_logprobs(batch, old=True)
    n = sum(s.num_tokens for s in seqs)
    for lp in (batch.old_logprobs, batch.ref_logprobs):
        assert lp.shape == (n,) and lp.dtype == torch.float32 and lp.device == learner.device
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor([s.num_tokens for s in seqs]).cumsum(0).tolist()]
    # a slice of sequences is a view of the batch's token columns, cu_seqlens rebased to 0
    part = batch[1:4]
    tokens = slice(int(batch.cu_seqlens[1]), int(batch.cu_seqlens[4]))
    assert part.cu_seqlens.tolist() == (batch.cu_seqlens[1:5] - batch.cu_seqlens[1]).tolist()
    mb = part.micro_batch()
    for name in ("targets", "origin", "old_logprobs", "ref_logprobs", "behavior_logprobs"):
        column = getattr(batch, name)[tokens]
        assert getattr(mb, name).data_ptr() == column.data_ptr() and torch.equal(getattr(mb, name), column), name
    assert torch.equal(mb.advantages, batch.advantages[1:4])
    # each micro-batch's log-probs landed in its own slice: one sequence at a time gives the same values
    for index, seq in enumerate(seqs):
        alone = learner._logprobs(learner.model, batch[index : index + 1].micro_batch())
        torch.testing.assert_close(alone.float(), batch.old_logprobs[batch.cu_seqlens[index] : batch.cu_seqlens[index + 1]],
                                   rtol=1e-5, atol=1e-5)


def test_missing_behaviour_logprobs_are_a_mask_not_a_nan(tiny_model_dir, processor):
    learner = make_learner(tiny_model_dir, processor, micro_batch_size=4)
    seqs = make_sequences(processor, 3, seed=3)  # sequence 2 is expert 1's, without behaviour log-probs
    seqs[0].behavior_logprobs[1] = float("nan")  # a token the generator gave none for
    batch = learner.pack(seqs)
    cu = batch.cu_seqlens.tolist()
    given = torch.ones(cu[-1], dtype=torch.bool)
    given[cu[0] + 1] = False
    given[cu[2] : cu[3]] = False
    assert batch.behavior_mask.dtype == torch.bool and torch.equal(batch.behavior_mask.cpu(), given)
    assert torch.isfinite(batch.behavior_logprobs).all()
    expected = [x for s in seqs if s.behavior_logprobs is not None for x in s.behavior_logprobs if x == x]
    assert batch.behavior_logprobs[batch.behavior_mask].tolist() == pytest.approx(expected)


# -- 12.3: every rank runs the same forwards, backwards and optimiser steps ---------------------------------------
def test_placeholder_micro_batches_add_exactly_nothing(tiny_model_dir, processor):
    from ekipl.packing import make_placeholder_micro_batch

    seqs = make_sequences(processor, 3, seed=1)
    results = []
    for extra in (0, 2):
        torch.manual_seed(0)
        learner = make_learner(tiny_model_dir, processor, loss=LossConfig(beta=0.04), micro_batch_size=2)
        batch = learner.pack(seqs)
        learner.fill_logprobs(batch, old=True)
        metrics = learner._mini_batch_step(batch, 2 + extra, seqs[0])
        results.append((metrics, [p.detach().clone() for p in learner.model.parameters()]))
    (plain, plain_weights), (padded, padded_weights) = results
    assert padded["loss"] == plain["loss"] and padded["grad_norm"] == plain["grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, padded_weights))
    placeholder = make_placeholder_micro_batch(seqs[0], 0, torch.device("cpu"))
    assert placeholder.loss_mask.shape == (seqs[0].num_tokens,) and not placeholder.loss_mask.any()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path, model_dir, shares, optim: dict, loss: dict, *, load_reference: bool,
               stage: int = 3) -> tuple[dict, dict]:
    """tests/learner_ranks.py on ``len(shares)`` CPU ranks; rank 0's metrics and updated weights."""
    out.mkdir()
    spec = {"model_dir": str(model_dir), "out": str(out), "num_seqs": 5, "seed": 7, "shares": shares, "stage": stage,
            "optim": {"lr": 1e-3, **optim}, "loss": loss, "load_reference": load_reference, "timeout_s": 120}
    (out / "spec.json").write_text(json.dumps(spec))
    world, port = len(shares), _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "learner_ranks.py"), str(out / "spec.json")],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=420) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(world))
    assert codes is not None, f"the ranks hung:\n{logs}"
    assert codes == [0] * world, logs
    return json.loads((out / "metrics.json").read_text()), torch.load(out / "weights.pt")


@pytest.mark.parametrize(
    "two_ranks, one_rank, one_rank_mini, load_reference",
    [
        # rank 0: 2 mini-batches of 2 micro-batches; rank 1: 1 mini-batch of 1 (then placeholders, and an empty one).
        # One rank on the union of each optimiser step's sequences: mini-batches {0,1,4} and {2,3}.
        ([[0, 1, 2, 3], [4]], [[0, 1, 4, 2, 3]], 3, True),
        # rank 1 holds nothing: its placeholders copy a sequence that rank 0 sends. The learner copies the reference
        # from the policy (before ZeRO-3 partitions it).
        ([[0, 1, 2], []], [[0, 1, 2]], 2, False),
    ],
    ids=["4+1", "3+0"],
)
def test_unequal_ranks_under_zero3_neither_hang_nor_change_the_update(two_ranks, one_rank, one_rank_mini, load_reference,
                                                                      tiny_model_dir, tmp_path):
    loss = {"beta": 0.04, "temperature": 0.9}
    optim = {"micro_batch_size": 1, "ppo_epochs": 2}
    two, two_weights = _run_ranks(tmp_path / "two", tiny_model_dir, two_ranks, {**optim, "mini_batch_size": 2}, loss,
                                  load_reference=load_reference)
    one, one_weights = _run_ranks(tmp_path / "one", tiny_model_dir, one_rank, {**optim, "mini_batch_size": one_rank_mini},
                                  loss, load_reference=load_reference)
    assert two["skipped_steps"] == one["skipped_steps"] == 0.0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    initial = {name: p.detach() for name, p in load_policy(tiny_model_dir).named_parameters()}
    assert one_weights.keys() == two_weights.keys() == initial.keys()
    update_one = torch.cat([(one_weights[k] - initial[k]).flatten() for k in sorted(initial)])
    update_two = torch.cat([(two_weights[k] - initial[k]).flatten() for k in sorted(initial)])
    assert update_one.norm() > 1e-3  # four Adam steps really moved the weights
    # Adam's steps are ~lr * sign(g): where g is ~0, rounding of the cross-rank sum may flip a few elements
    assert (update_one - update_two).norm() / update_one.norm() < 1e-3


# -- 12.4: the offloaded reference -------------------------------------------------------------------------------
def test_an_offloaded_reference_runs_on_the_learner_device_and_goes_back(tiny_model_dir, processor, monkeypatch):
    learner = make_learner(tiny_model_dir, processor, loss=LossConfig(beta=0.04), micro_batch_size=2,
                           offload_reference=True)
    reference = learner.reference
    assert next(reference.parameters()).device == torch.device("cpu")
    seqs = make_sequences(processor, 3, seed=2)
    # The CPU is the only device here: pretend the reference lives elsewhere, and record its moves instead of making them.
    elsewhere = torch.device("meta")
    real_device_of = learner_module._device_of
    monkeypatch.setattr(learner_module, "_device_of", lambda m: elsewhere if m is reference else real_device_of(m))
    moves, head_calls = [], []
    monkeypatch.setattr(reference, "to", lambda device: moves.append(torch.device(device)) or reference)
    reference.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: head_calls.append((list(moves), args[0].device))
    )
    batch = learner.pack(seqs)
    learner.fill_logprobs(batch, old=True)
    assert moves == [learner.device, elsewhere]  # there for the pass, then home
    assert head_calls == [([learner.device], learner.device)] * 2  # both micro-batches on the learner's device
    # the reference starts as the policy: the same log-probs, on the learner's device like the old ones
    assert batch.ref_logprobs.device == batch.old_logprobs.device == learner.device == torch.device("cpu")
    torch.testing.assert_close(batch.ref_logprobs, batch.old_logprobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the learner on CUDA, the reference in host memory")
def test_an_offloaded_reference_on_a_gpu(tiny_model_dir, processor):
    join_process_group()
    learner = Learner(load_policy(tiny_model_dir, device="cuda"), loss=LossConfig(beta=0.04),
                      optim=OptimConfig(lr=1e-3, micro_batch_size=2), ds_config=ds_config(0), max_steps=2,
                      pad_id=processor.tokenizer.pad_token_id, reference=load_policy(tiny_model_dir, device="cuda"),
                      offload_reference=True)
    assert next(learner.reference.parameters()).device.type == "cpu"
    batch = learner.pack(make_sequences(processor, 3, seed=2))
    learner.fill_logprobs(batch, old=True)
    assert next(learner.reference.parameters()).device.type == "cpu"
    assert batch.ref_logprobs.device.type == batch.old_logprobs.device.type == "cuda"
    torch.testing.assert_close(batch.ref_logprobs, batch.old_logprobs, rtol=1e-4, atol=1e-5)
    assert learner.update(batch)["skipped_steps"] == 0.0


# -- 12.5: behaviour log-probs that the loss needs and the generator did not give --------------------------------
def test_tokens_without_behaviour_logprobs_warn_once_and_are_counted(tiny_model_dir, processor):
    learner = make_learner(tiny_model_dir, processor, loss=LossConfig(expert_mode="is", tis_cap=2.0),
                           micro_batch_size=4, expert_names=["gpt-4o"])
    seqs = make_sequences(processor, 6, seed=3)  # sequences 2 and 5 are expert 1's, without behaviour log-probs
    seqs[0].behavior_logprobs = None  # a policy answer whose rollout engine gave none
    seqs[1].behavior_logprobs[0] = float("nan")  # and one token of another
    batch = learner.pack(seqs)
    learner.fill_logprobs(batch)  # the update needs old log-probs to stand in for the missing ones
    assert batch.old_logprobs is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = learner.update(batch)
    messages = [str(w.message) for w in caught if "behaviour log-probs" in str(w.message)]
    assert len(messages) == 2, messages
    expert, policy = messages
    assert "loss.expert_mode=is" in expert and "'gpt-4o' (origin 1)" in expert
    assert "sglang" in expert and "expert_mode=ratio or shaped" in expert
    assert "loss.tis_cap=2" in policy
    assert metrics["loss/tokens_expert_without_behavior"] == seqs[2].num_tokens + seqs[5].num_tokens
    assert metrics["loss/tokens_policy_without_behavior"] == seqs[0].num_tokens + 1
    assert metrics["skipped_steps"] == 0.0 and math.isfinite(metrics["loss"])
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert learner.update(batch)["loss/tokens_expert_without_behavior"] > 0
    assert not [w for w in again if "behaviour log-probs" in str(w.message)]


def test_no_count_or_warning_when_the_loss_needs_no_behaviour_logprobs(tiny_model_dir, processor):
    learner = make_learner(tiny_model_dir, processor, micro_batch_size=4)
    batch = learner.pack(make_sequences(processor, 3, seed=3))
    learner.fill_logprobs(batch)
    assert batch.old_logprobs is None  # one optimiser step: pi_old is pi_theta, no pass needed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = learner.update(batch)
    assert not [w for w in caught if "behaviour log-probs" in str(w.message)]
    assert not [key for key in metrics if "without_behavior" in key]
