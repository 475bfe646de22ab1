"""Greedy chat answers of a model on vLLM; prints one JSON line `RESULT {...}`.

    python tests/vllm_chat.py MODEL_DIR PROMPTS.json MAX_TOKENS

PROMPTS.json is a list of chat message lists. Run as a script: vLLM spawns processes, so it
needs the __main__ guard."""

import json
import sys

if __name__ == "__main__":
    import os

    # The engine core and the model in this process: two processes fewer to spawn and import
    # vLLM into (a quarter of a minute on 2 busy cores); the model runs as it would in them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    model_dir, prompts_file, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    chats = json.loads(open(prompts_file).read())
    llm = LLM(model_dir, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True,
              enable_chunked_prefill=False, max_num_batched_tokens=2048, seed=0)
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    print("RESULT " + json.dumps({"prompt_ids": [list(o.prompt_token_ids) for o in outputs],
                                  "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                                  "text": [o.outputs[0].text for o in outputs]}))
