"""The pure parts of the CLAIR stage: contrast statistics, prompts and parsers, the verifier."""

import json
import random

import pytest

from rayalign.clair import contrast, revision, verifier


def levenshtein_by_hand(a, b):
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def test_jaccard_on_known_strings():
    # {the, cat, sat, .} vs {the, cat, sits, .}: 3 shared of 5 distinct.
    assert contrast.jaccard("The cat sat.", "The cat sits.") == pytest.approx(3 / 5)
    assert contrast.jaccard("a b a b", "b a") == 1.0  # sets, not multisets
    assert contrast.jaccard("x", "y") == 0.0
    assert contrast.jaccard("", "") == 1.0
    assert contrast.tokens("It's 4,5!") == {"It", "'", "s", "4", ",", "5", "!"}


def test_levenshtein_on_known_strings_and_against_the_recurrence():
    assert contrast.levenshtein("kitten", "sitting") == 3
    assert contrast.levenshtein("0 7 1 9", "0 7 2 9") == 1
    assert contrast.levenshtein("", "abc") == 3
    rng = random.Random(0)
    for _ in range(50):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 12)))
        assert contrast.levenshtein(a, b) == levenshtein_by_hand(a, b)


def test_contrast_and_describe():
    assert contrast.contrast("0 7 2 9", "0 7 1 9") == {"jaccard": pytest.approx(3 / 5), "levenshtein": 1}
    d = contrast.describe([0.0, 0.25, 0.5, 1.0], bins=4, lo=0.0, hi=1.0)
    assert d["count"] == 4
    assert d["mean"] == pytest.approx(0.4375)
    assert d["median"] == pytest.approx(0.375)
    assert d["histogram"] == {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [1, 1, 1, 1]}
    assert contrast.describe([])["mean"] is None


@pytest.mark.parametrize("text, expected", [
    ("Let me think.\n<revision>\nThe answer is 4.\n</revision>", "The answer is 4."),
    ("I will write <revision>x</revision> as the format.\n<revision>final</revision>", "final"),
    ("<revision>  multi\nline  </revision> trailing", "multi\nline"),
])
def test_parse_revision_from_markers(text, expected):
    assert revision.parse_revision(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("no markers at all", "no <revision>...</revision> section"),
    ("<revision>unclosed", "no <revision>...</revision> section"),
])
def test_unparsable_revisions_say_why(text, reason):
    with pytest.raises(revision.Unparsable, match=reason):
        revision.parse_revision(text)


def test_parse_structured_revision_and_verdict():
    assert revision.parse_revision(json.dumps({"reasoning": "r", "revision": " 4 \n"}), structured=True) == "4"
    with pytest.raises(revision.Unparsable, match="structured output is not valid JSON"):
        revision.parse_revision('{"reasoning": "r", "revi', structured=True)
    with pytest.raises(revision.Unparsable, match="structured output has no string field 'revision'"):
        revision.parse_revision('{"reasoning": "r"}', structured=True)
    assert revision.parse_verdict(json.dumps({"reasoning": "", "verdict": "B"}), structured=True) == "B"
    assert revision.parse_verdict("because... <verdict> a. </verdict>") == "A"
    assert revision.parse_verdict("<verdict>Tie</verdict>") == "tie"
    with pytest.raises(revision.Unparsable, match="verdict 'both' is not A, B or tie"):
        revision.parse_verdict("<verdict>both</verdict>")


def test_swap_consistent_verdicts():
    # The second verdict was asked with the answers swapped.
    assert revision.swap_consistent("A", "B") == "A"
    assert revision.swap_consistent("B", "A") == "B"
    assert revision.swap_consistent("A", "A") == "tie"   # position bias: always the first
    assert revision.swap_consistent("A", "tie") == "tie"
    assert revision.swap_consistent("tie", "tie") == "tie"


def test_requests_embed_prompt_answer_and_markers():
    text = revision.revision_request([{"role": "user", "content": "What is 2+2?"}], "5")
    assert "[user] What is 2+2?" in text and "# Student answer\n5\n" in text
    assert "between <revision> and </revision>" in text
    custom = revision.revision_request("Q", "A", template="Fix {answer} for {prompt} in {start}{end}")
    assert custom == "Fix A for Q in <revision></revision>"
    judged = revision.judge_request("Q", "one", "two", structured=True)
    assert "# Answer A\none" in judged and "# Answer B\ntwo" in judged
    assert judged.endswith('Answer with a JSON object with the fields "reasoning" and "verdict".')


def test_verifier_normalisation_and_correctness():
    assert verifier.normalize("  The  Answer\tIS 42. ") == "the answer is 42"
    assert verifier.is_correct("0 7 1 9", "0 7 1 9")
    assert not verifier.is_correct("0 7 1 8", "0 7 1 9")
    assert verifier.is_correct("Work: 3+4.\nanswer: 7", "7", pattern=r"answer:\s*(.+)")
    # A response that is the reference, written with other spacing or a final period, is right
    # whatever its words: even words of the question, which are otherwise never the answer.
    question = "add: 1 2 3 + 4 5 6"
    for response in ("7 3 add +", "add", "the the", "Dark, stormy night"):
        reference = "\n  " + response.replace(" ", "\t") + " .\n"
        assert verifier.answer_span(" " + response + ".", reference, question=question) == (1, len(response) + 1)
        assert verifier.is_correct(response, reference, question=question)
        assert verifier.revise(response, reference, question=question) == response
    assert not verifier.is_correct("7 3 add", "7 3 add +", question=question)


def test_verifier_revision_is_minimal():
    # Whole response is the answer: the revision is the reference.
    assert verifier.revise("0 7 1 8", "0 7 1 9") == "0 7 1 9"
    # A digit task's answer is the whole response, however long: it is replaced whole.
    assert not verifier.is_correct("0 7 1 9 9 9", "0 7 1 9", question="add: 1 2 3 + 4 5 6")
    assert verifier.revise("0 7 1 9 9 9", "0 7 1 9", question="add: 1 2 3 + 4 5 6") == "0 7 1 9"
    # With a pattern only the final answer changes; the reasoning is kept verbatim.
    response = "First 3+4 is 8.\nanswer: 8"
    assert verifier.revise(response, "7", pattern=r"answer:\s*(.+)") == "First 3+4 is 8.\nanswer: 7"
    # Already correct: the revision is the response itself (the pipeline rejects it as identical).
    assert verifier.revise("answer: 7", "7", pattern=r"answer:\s*(.+)") == "answer: 7"
    # No final answer to correct.
    assert verifier.revise("I do not know", "7", pattern=r"answer:\s*(.+)") is None


def test_verifier_score_prefers_the_closer_answer():
    assert verifier.score("0 7 1 9", "0 7 1 9") == 1.0
    near, far = verifier.score("0 7 1 8", "0 7 1 9"), verifier.score("9 9 9 9", "0 7 1 9")
    assert near == pytest.approx(0.999 * (1 - 1 / 7))
    assert far == pytest.approx(0.999 * (1 - 3 / 7))  # three digits differ
    assert verifier.score("nothing", "7", pattern=r"answer:\s*(.+)") == 0.0


# Real answers of SmolLM2-135M-Instruct (greedy, chat template), as the verifier meets them.
@pytest.mark.parametrize("question, reference, response, revised", [
    ("What is 23 + 24?", "47", "23 + 24 equals 58.", "23 + 24 equals 47."),
    # Every mention of the wrong value goes, in its own form; the question's numbers stay.
    ("What is 97 + 60?", "157", "The answer is 15. 97 + 60 equals 15.", "The answer is 157. 97 + 60 equals 157."),
    ("How many legs does a duck have?", "2", "The answer to this classic question is 4. A duck has four legs.",
     "The answer to this classic question is 2. A duck has two legs."),
    ("What is the sum of nineteen and two?", "21", 'The answer is "twenty-five."', 'The answer is "twenty-one."'),
    ('How many times does the letter "i" appear in the word "giraffe"?', "1",
     'The letter "i" appears twice in the word "giraffe".', 'The letter "i" appears once in the word "giraffe".'),
    ('How many times does the letter "b" appear in the word "strawberry"?', "1",
     'The letter "b" appears 2 times in the word "strawberry".', 'The letter "b" appears 1 time in the word "strawberry".'),
    ("What is the capital of Australia?", "Canberra", "The capital of Australia is Sydney.",
     "The capital of Australia is Canberra."),
    ("What is the capital of Brazil?", "Brasilia", "The capital of Brazil is Sao Paulo.",
     "The capital of Brazil is Brasilia."),
    # A quoted answer is replaced where it is quoted again, and nowhere else.
    ('What is the opposite of "clean"?', "dirty", 'The opposite of "clean" is "degraded" or "degraded" is a rare word.',
     'The opposite of "clean" is "dirty" or "dirty" is a rare word.'),
    ('What is the opposite of "old"?', "young", 'The opposite of "old" is "new" - a new era.',
     'The opposite of "old" is "young" - a new era.'),
    ('What is the plural of "goose"?', "geese", 'The plural of "goose" is "goosees."', 'The plural of "goose" is "geese."'),
    ("What is the capital of Spain?", "Madrid", "El Salvador, also known as La España, is the capital of Spain.",
     "Madrid, also known as La España, is the capital of Spain."),
    # Short answers: the answer in them is replaced, the rest kept.
    ("What is the capital of France?", "Paris", "Lyon.", "Paris."),
    ("What is the capital of France?", "Paris", "It's Rome.", "It's Paris."),
    ("You have three apples and get four more. How many apples do you have?", "7", "Eight apples.", "Seven apples."),
    # A short answer with nothing new in it is replaced whole.
    ("What is the capital of France?", "Paris", "France.", "Paris"),
    # The answer comes before a quoted mention of it: the answer is revised.
    ("What is the capital of Lithuania?", "Vilnius", 'The capital of Lithuania is Lilava, or "Lilava" in Lithuanian.',
     'The capital of Lithuania is Vilnius, or "Lilava" in Lithuanian.'),
])
def test_verifier_revises_only_the_wrong_answer_in_prose(question, reference, response, revised):
    assert not verifier.is_correct(response, reference, question=question)
    assert verifier.revise(response, reference, question=question) == revised
    assert verifier.is_correct(revised, reference, question=question)


@pytest.mark.parametrize("question, reference, response, found", [
    ("What is 20 + 8?", "28", "20 + 8 = 28", "28"),
    ("What is the capital of Russia?", "Moscow", "The capital of Russia is Moscow.", "Moscow"),
    ("What is the capital of Russia?", "Moscow", "Moscow is the capital of Russia.", "Moscow"),
    ('What is the opposite of "up"?', "down", 'The opposite of "up" is "down" in mathematics.', "down"),
    ("What language is spoken in Brazil?", "Portuguese", "The language spoken in Brazil is predominantly Portuguese.",
     "predominantly Portuguese"),
    ("What is 4 + 9?", "13", "To solve this, you need to add 4 and 9, which is thirteen.", "thirteen"),
    ("What is the capital of France?", "Paris", "Paris.", "Paris"),
    # Short answers that say more than the answer.
    ("What is the capital of France?", "Paris", "It's Paris.", "Paris"),
    ("What is the capital of France?", "Paris", "Paris, France.", "Paris"),
    ("What is the capital of India?", "New Delhi", "It's New Delhi.", "New Delhi"),
    ("You have three apples and get four more. How many apples do you have?", "7", "Seven apples.", "Seven"),
])
def test_verifier_finds_a_right_answer_in_prose(question, reference, response, found):
    start, end = verifier.answer_span(response, reference, question=question)
    assert response[start:end] == found
    assert verifier.is_correct(response, reference, question=question)
    assert verifier.revise(response, reference, question=question) == response
    assert verifier.score(response, reference, question=question) == 1.0


@pytest.mark.parametrize("question, reference, response", [
    # Only the question's own numbers, or a number inside a longer word: no answer.
    ("What is 34 + 33?", "67", "Three-fourths of a dozen is 34 + 33."),
    ("What is six plus eleven?", "17", "Six plus eleven is the sum of six and eleven."),
    # A description, not an answer.
    ("What is the capital of Cuba?", "Havana", "Cuba is a Latin American country located in the Caribbean."),
    ("What is the capital of Belgium?", "Brussels", "Belgium is the largest European country, bordering France."),
    # An answer that repeats the question cannot be told from the question.
    ("Which day comes after Sunday?", "Monday", "The day after Sunday is Sunday."),
])
def test_verifier_finds_no_answer_where_there_is_none(question, reference, response):
    assert verifier.answer_span(response, reference, question=question) is None
    assert verifier.revise(response, reference, question=question) is None
    assert not verifier.is_correct(response, reference, question=question)
    assert verifier.score(response, reference, question=question) == 0.0


def test_number_values_in_digits_and_words():
    assert [verifier.number_value(t) for t in ("1,024", "-3.5", "twenty-one", "Twenty one", "twice", "nineteen")] == [
        1024, -3.5, 21, 21, 2, 19]
    assert verifier.number_value("twentyish") is None


def test_the_openai_clients_request_log_stays_off_the_console():
    """One INFO line per HTTP request would drown the progress of evaluation and revision once a
    library (Ray Serve) sets the root logger to INFO; the openai client's HTTP library is quiet."""
    import logging

    import openai._base_client as client

    import rayalign.clair.endpoint  # noqa: F401  (sets the levels)

    http = next(getattr(client, name) for name in ("httpx2", "httpx") if hasattr(client, name))
    logger = logging.getLogger(http.__name__.split(".")[0])
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as Ray Serve sets it
    try:
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(level)


def test_every_sampling_field_reaches_vllms_sampling_params_or_the_units():
    """clair.sampling: temperature, top_p and max_tokens go into each request's SamplingParams;
    n is the number of units (samples) per prompt, seed the base of every unit's own seed."""
    import dataclasses

    from vllm import SamplingParams

    from rayalign import llm
    from rayalign.clair.outcomes import make_units
    from rayalign.clair.stages import target_request
    from rayalign.config import SamplingConfig

    assert {f.name for f in dataclasses.fields(SamplingConfig)} == {"temperature", "top_p", "max_tokens", "n", "seed"}
    sampling = SamplingConfig(temperature=0.3, top_p=0.42, max_tokens=17, n=3, seed=5)
    prompts = [{"id": "p1", "prompt": "add: 1 + 2"}, {"id": "p2", "prompt": "add: 3 + 4"}]
    units = make_units(prompts, sampling.n, sampling.seed)
    assert [u["unit_id"].startswith("p1") for u in units] == [True] * 3 + [False] * 3
    params = [SamplingParams(**llm.sampling_params(target_request(sampling)(u))) for u in units]
    assert {(p.temperature, p.top_p, p.max_tokens) for p in params} == {(0.3, 0.42, 17)}
    assert [p.seed for p in params] == [u["seed"] for u in units] and len({p.seed for p in params}) == 6
    assert [u["seed"] for u in make_units(prompts, 3, 6)] != [u["seed"] for u in units]
    # A default top_p (1.0) is sent as such; a request without one leaves vLLM's default.
    assert SamplingParams(**llm.sampling_params(target_request(SamplingConfig())(units[0]))).top_p == 1.0
    assert "top_p" not in llm.sampling_params({"temperature": 0.0, "max_tokens": 4})


def test_every_engine_field_reaches_vllms_engine_arguments_or_rays_placement():
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from rayalign import llm
    from rayalign.config import EngineConfig

    engine = EngineConfig(dtype="float16", max_model_len=333, gpu_memory_utilization=0.42, tensor_parallel_size=2,
                          concurrency=3, batch_size=7, cpus_per_engine=2.5, gpus_per_engine=1,
                          resources={"node_a": 1}, engine_args={"max_num_seqs": 5},
                          structured_output_backend="xgrammar")
    assert {f.name for f in dataclasses.fields(EngineConfig)} == {
        "dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "concurrency", "batch_size",
        "cpus_per_engine", "gpus_per_engine", "resources", "engine_args", "structured_output_backend"}
    config = llm.processor_config("/models/m", engine)
    # vLLM's own argument class takes every engine argument (Ray adds its task_type for itself).
    args = EngineArgs(model="/models/m", **{k: v for k, v in config.engine_kwargs.items() if k != "task_type"})
    assert (args.dtype, args.max_model_len, args.gpu_memory_utilization, args.tensor_parallel_size,
            args.max_num_seqs) == ("float16", 333, 0.42, 2, 5)
    assert args.structured_outputs_config["backend"] == "xgrammar"
    assert (config.concurrency, config.batch_size) == (3, 7)
    # One bundle per tensor-parallel worker, each with the engine's CPUs, GPU and custom resources.
    assert config.placement_group_config["bundles"] == [{"CPU": 2.5, "GPU": 1, "node_a": 1}] * 2
    # engine_args override what the fields derive.
    override = dataclasses.replace(engine, engine_args={"max_model_len": 444})
    assert llm.processor_config("/models/m", override).engine_kwargs["max_model_len"] == 444


def test_the_reference_engine_reaches_vllm_in_the_training_precision_and_asks_for_prompt_logprobs():
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    from rayalign import llm
    from rayalign.config import load_config
    from rayalign.train.reference import reference_engine

    config = load_config(None, ["reference.backend=vllm", "reference.engine.max_model_len=1500",
                                "reference.engine.concurrency=2", "reference.engine.batch_size=5",
                                "reference.engine.cpus_per_engine=3"])
    for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        processor = llm.processor_config("/models/m", reference_engine(config, precision))
        args = EngineArgs(model="/models/m", **{k: v for k, v in processor.engine_kwargs.items() if k != "task_type"})
        assert (args.dtype, args.max_model_len) == (dtype, 1500)
        assert (processor.concurrency, processor.batch_size) == (2, 5)
        assert [(b["CPU"], b.get("GPU", 0)) for b in processor.placement_group_config["bundles"]] == [(3, 0)]
    params = SamplingParams(**llm.SCORE_PARAMS)
    assert (params.prompt_logprobs, params.max_tokens, params.detokenize) == (0, 1, False)


def test_the_prompt_is_rendered_by_the_models_chat_template_as_rays_stage_renders_it(smollm2):
    from transformers import AutoTokenizer

    from rayalign import llm

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = llm.render(smollm2, asked)
    assert prompt == tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    # An assistant turn that ends the list is continued, not closed (a prefill).
    prefilled = llm.render(smollm2, [*asked, {"role": "assistant", "content": "Blu"}])
    assert prefilled == prompt + "Blu"
    # vLLM is configured to render nothing itself: no chat template, tokenize or detokenize stage.
    from rayalign.config import EngineConfig

    config = llm.processor_config(str(smollm2), EngineConfig())
    assert (config.chat_template_stage, config.tokenize_stage, config.detokenize_stage) == (False, False, False)


def test_a_one_worker_cpu_engine_runs_its_model_in_the_engine_core_process():
    from rayalign import llm
    from rayalign.config import EngineConfig

    config = llm.processor_config("/models/m", EngineConfig())
    assert config.engine_kwargs["distributed_executor_backend"] == "uni"
    # vLLM's CPU platform keeps `uni` only where V1 multiprocessing is off in the engine's actor.
    assert config.runtime_env == {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    # GPUs, several workers, or the user's own executor: vLLM's choice or the user's, no env.
    for engine in (EngineConfig(gpus_per_engine=1), EngineConfig(tensor_parallel_size=2),
                   EngineConfig(engine_args={"pipeline_parallel_size": 2}),
                   EngineConfig(engine_args={"distributed_executor_backend": "mp"})):
        config = llm.processor_config("/models/m", engine)
        assert config.engine_kwargs.get("distributed_executor_backend") == engine.engine_args.get(
            "distributed_executor_backend") and not config.runtime_env
