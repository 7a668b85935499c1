"""DDP: two CPU processes (gloo) train the tiny model with CGMLLMTrainer, stay in sync and save one checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch
    from datasets import Dataset
    from transformers import TrainingArguments
    from cgmllm.training.collator import CGMLLMDataCollator
    from cgmllm.training.testing import PRIMITIVES, tiny_model, tiny_processor
    from cgmllm.training.trainer import CGMLLMTrainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    rng = np.random.default_rng(0)
    captions = list(PRIMITIVES.values()) * 2
    data = Dataset.from_dict({"uid": [str(i) for i in range(len(captions))], "caption": captions,
                              "latents": [rng.standard_normal((4, 8)).astype("float32") for _ in captions]})
    processor = tiny_processor()
    model = tiny_model(processor)
    collator = CGMLLMDataCollator(processor, 4, condition_dropout=0.5, max_tokens=48)
    args = TrainingArguments(out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                             remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="steps",
                             save_steps=2, ddp_backend="gloo", seed=0)
    trainer = CGMLLMTrainer(model=model, args=args, train_dataset=data, data_collator=collator, ema_decay=0.9)
    trainer.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    result = {"world_size": args.world_size, "rank": args.process_index, "checksum": checksum,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "terms": [(e["lm_loss"], e["flow_loss"]) for e in trainer.state.log_history if "loss" in e]}
    with open(os.path.join(out, f"rank{args.process_index}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.destroy_process_group()  # as cgmllm-train does: implicit teardown at exit can abort
    """
)


def test_two_process_gloo_ddp_training(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               # torchrun's own rendezvous on a port it binds itself: no probe-then-bind race with other processes.
               "--standalone", str(script), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=110,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["losses"]) == 3 and all(loss == loss for loss in ranks[0]["losses"])
    # The logged terms are global like `loss` (summed over both processes' shares), not rank 0's share.
    for rank in ranks:
        for loss, (lm_loss, flow_loss) in zip(rank["losses"], rank["terms"]):
            assert lm_loss > 0 and flow_loss > 0
            assert lm_loss + flow_loss == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert ranks[0]["terms"] == ranks[1]["terms"]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # gradients all-reduced
    # The checkpoint, staged then renamed, holds both processes' RNG states and the EMA; nothing is left half-written.
    checkpoint = tmp_path / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", "ema.safetensors", "trainer_state.json"} <= {
        path.name for path in checkpoint.iterdir()}
    assert not list(tmp_path.glob(".incomplete-*"))
