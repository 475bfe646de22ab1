"""Run as a script by test_train_parts: two processes (gloo, CPU) load the policy with
rayalign.train.engine.load_policy under ZeRO-3, then a frozen model as the on-the-fly reference is
loaded, and each process writes what it holds to <out>/rank<r>.json, with whether the export's
gathered state dict (rank 0's; None elsewhere) equals the checkpoint's, key by key, and what the
on-the-fly reference (rayalign.train.engine.load_reference) holds and computes.

Usage: python tests/zero3_load.py MODEL_DIR OUT_DIR PORT"""

import json
import os
import sys
from pathlib import Path

import torch.multiprocessing as mp


def worker(rank: int, model: str, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_SIZE="2", CUDA_VISIBLE_DEVICES="")
    import deepspeed
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    from rayalign.config import load_config
    from rayalign.train.engine import deepspeed_config, gathered_state_dict, load_model, load_policy, load_reference

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo")
    train = load_config(None, [f"train.model={model}", "train.zero_stage=3", "train.batch_size=2",
                               "train.micro_batch_size=1", "train.num_workers=2"]).train
    policy = load_policy(train, "fp32", deepspeed_config(train, "fp32"))
    params = list(policy.parameters())
    held = {"partitioned": all(hasattr(p, "ds_tensor") for p in params),
            "local": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
            "whole": sum(p.ds_numel for p in params if hasattr(p, "ds_numel")),
            "visible": sum(p.numel() for p in params), "count": len(params),
            "zero3_after_load": is_deepspeed_zero3_enabled()}
    # The policy's weights, gathered, equal the checkpoint's.
    name, param = "model.embed_tokens.weight", dict(policy.named_parameters())["model.embed_tokens.weight"]
    with deepspeed.zero.GatheredParameters([param]):
        gathered = param.detach().clone()
    exported = gathered_state_dict(policy, rank)
    reference = load_model(model, "fp32", trainable=False)
    if exported is None:
        held["export"] = None
    else:
        expected = reference.state_dict()
        held["export"] = {"keys_equal": sorted(exported) == sorted(expected),
                          "tensors_equal": all(torch.equal(exported[k], expected[k]) for k in expected if k in exported),
                          "on_cpu": all(t.device.type == "cpu" for t in exported.values())}
    held["reference_visible"] = sum(p.numel() for p in reference.parameters())
    # The on-the-fly reference under ZeRO-3: partitioned like the policy, and its log-probs are the
    # whole model's (each rank scores its own pairs; the gathers are collective).
    from transformers import AutoTokenizer

    from rayalign.tasks import addition_prompts
    from rayalign.train.data import tokenize_pairs
    from rayalign.train.forward import pair_logps

    on_the_fly = load_reference(model, train, "fp32", "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = tokenize_pairs(tokenizer, [{"id": r["id"], "prompt": r["prompt"], "chosen": r["reference"],
                                       "rejected": r["reference"][::-1]} for r in addition_prompts(4, seed=rank)],
                          64, 32).rows
    with torch.no_grad():
        partitioned = pair_logps(on_the_fly, rows, tokenizer.pad_token_id)
        whole = pair_logps(reference, rows, tokenizer.pad_token_id)
    ref_params = list(on_the_fly.module.parameters())
    held["on_the_fly"] = {
        "local": sum(p.ds_tensor.numel() for p in ref_params if hasattr(p, "ds_tensor")),
        "visible": sum(p.numel() for p in ref_params),
        "max_difference": max((partitioned[k] - whole[k]).abs().max().item() for k in ("chosen", "rejected"))}
    held["embed_equal"] = bool(torch.equal(gathered, dict(reference.named_parameters())[name]))
    Path(out, f"rank{rank}.json").write_text(json.dumps(held))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=tuple(sys.argv[1:4]), nprocs=2, join=True)
