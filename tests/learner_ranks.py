"""One rank of a multi-rank learner run, started by tests/test_learner.py: ``python tests/learner_ranks.py SPEC``.

SPEC (JSON) names the tiny model, the sequences every rank builds alike (``num_seqs``, ``seed``), which of them
each rank trains on (``shares``, one index list per rank), the ZeRO stage, the loss and optimiser settings, and
whether the reference model is loaded apart (as ekipl/train.py does) or left to the learner to copy from the policy.
Each rank packs its sequences, fills old/reference log-probs and runs one update; rank 0 then writes ``metrics.json`` and the
updated weights (``weights.pt``) to ``out``. The process group times out after ``timeout_s``, so a rank left
waiting in a collective fails instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=spec["timeout_s"]))
    from ekipl.learner import Learner, OptimConfig
    from ekipl.models import load_policy, load_processor
    from ekipl_kernels import LossConfig
    from fakes.learner_setup import ds_config, make_sequences

    rank = dist.get_rank()
    processor = load_processor(spec["model_dir"])
    every = make_sequences(processor, spec["num_seqs"], seed=spec["seed"])
    seqs = [every[i] for i in spec["shares"][rank]]
    torch.manual_seed(0)
    reference = load_policy(spec["model_dir"]).eval().requires_grad_(False) if spec["load_reference"] else None
    learner = Learner(load_policy(spec["model_dir"]), loss=LossConfig(**spec["loss"]), optim=OptimConfig(**spec["optim"]),
                      ds_config=ds_config(spec["stage"]), max_steps=10, pad_id=processor.tokenizer.pad_token_id,
                      reference=reference)
    batch = learner.pack(seqs)
    learner.fill_logprobs(batch, old=True)
    metrics = learner.update(batch)
    weights = {name: w.cpu() for name, w in learner.named_weights()}
    if rank == 0:
        out = Path(spec["out"])
        (out / "metrics.json").write_text(json.dumps(metrics))
        torch.save(weights, out / "weights.pt")


if __name__ == "__main__":
    main(sys.argv[1])
