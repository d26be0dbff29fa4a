"""Run by ``torchrun --nproc_per_node 2``: a tiny Hugging Face family built under ``deepspeed.zero.Init``, sparsified,
``deepspeed.initialize`` + ``stsc.integrations.deepspeed.attach``, trained through both stages of ``POLICY``.

    torchrun --nproc_per_node 2 tests/distributed/zero_init_family.py FAMILY

The model is built as ``from_pretrained`` builds it once ``TrainingArguments(deepspeed=...)`` exist: an
``HfDeepSpeedConfig`` of the engine's ZeRO-3 config is alive, and ``_from_config`` builds under ``zero.Init``, each
rank holding only its partition of every weight (random weights: no reference here, see ``train_worker.py --init
zero`` for one). Rank 0 prints ``RESULT {json}``: where the stages were checked at sparsify (None: not yet), and per
optimizer step the stage, the loss and the blocks skipped.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import hf_models  # noqa: E402

import stsc  # noqa: E402
import stsc.integrations.deepspeed  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402

POLICY = parse_policy("""
version: 1
stages:
  - {name: alignment, steps: 2, passes: {compress_visual_tokens: {method: uniform, keep_ratio: 0.5}}}
  - {name: instruction, steps: 2, passes: {skip_layers: {schedule: constant, alpha: 0.9, eps: 0.1}}}
""")
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def main(family: str) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see train_worker.init_process_group
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    whole, inputs = hf_models.BUILDERS[family]()  # its config, and real inputs (the whole model is not trained)
    ds_config = HfDeepSpeedConfig(CONFIG)  # noqa: F841 - alive while building: from_config builds under zero.Init
    torch.manual_seed(0)
    model = type(whole)._from_config(whole.config).train()
    sparse = stsc.sparsify(model, POLICY, inputs)
    engine, _, _, _ = deepspeed.initialize(model=sparse, optimizer=torch.optim.AdamW(sparse.parameters(), lr=1e-3),
                                           config=CONFIG)
    stsc.integrations.deepspeed.attach(engine, sparse)
    checked_on = sparse.report.checked_on
    stages, losses, skipped = [], [], []
    for _ in range(4):
        sparse.set_progress(step=engine.global_steps)
        loss = engine(**inputs)["loss"]
        engine.backward(loss)
        engine.step()
        skipper = sparse.runtimes.get("skip_layers")
        stages.append(sparse.stage)
        losses.append(loss.item())
        skipped.append(skipper.last_skipped if skipper else None)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"family": family, "checked_on": checked_on, "stages": stages, "losses": losses,
                                      "skipped": skipped}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # see train_worker.leave


if __name__ == "__main__":
    main(sys.argv[1])
