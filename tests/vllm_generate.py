"""Greedy generation with vLLM and with transformers on the same model; prints JSON.

Run as a script (vLLM spawns processes, so it needs the __main__ guard):
    python tests/vllm_generate.py MODEL_DIR MAX_TOKENS [eager]
`eager` skips torch.compile (vLLM's enforce_eager), about 20 s less per engine start here."""

import json
import sys

if __name__ == "__main__":
    import os

    # The engine core and the model in this process: two processes fewer to spawn and import
    # vLLM into (a quarter of a minute on 2 busy cores); the model runs as it would in them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    model_dir, max_tokens, eager = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["eager"]
    prompts = ["Hello there, what is the answer?", "add: 1 2 3 + 4 5 6 answer:"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_ids = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        hf_ids.append(out[0, ids.shape[1]:].tolist())
    llm = LLM(model_dir, dtype="float32", gpu_memory_utilization=0.1, max_model_len=256, seed=0, enforce_eager=eager)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    outputs = llm.generate(prompts, params)
    print("RESULT " + json.dumps({
        "vllm": [list(o.outputs[0].token_ids) for o in outputs],
        "hf": hf_ids,
        "text": [o.outputs[0].text for o in outputs],
    }))
