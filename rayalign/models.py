"""Tiny local models: a Llama-architecture model with random weights and a locally trained tokenizer.

No model hub is needed: the tokenizer is trained in seconds with `tokenizers` on a built-in
corpus, the weights come from a seeded initialisation, and both are saved in Hugging Face
format that transformers and vLLM load directly. head_dim is 64 because vLLM's CPU attention
rejects smaller heads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS, UNK = SPECIAL_TOKENS[:4]

# Each turn is a role marker, the content and the end-of-sequence token, so a completion the
# model learns to produce is exactly `content + eos`.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int


PRESETS = {
    # For tests: builds in about a second.
    "tiny": Preset(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                   max_position_embeddings=2048),
    # For benchmarks: about 25M parameters, large enough that compute dominates overheads.
    "bench": Preset(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8,
                    max_position_embeddings=2048),
    # For serving benchmarks: about 160M parameters. Decoding at 25M on CPU is largely per-step
    # Python; here the model's compute weighs more in each step.
    "bench-large": Preset(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
                          max_position_embeddings=2048),
}

_WORDS = (
    "the a an of to and in is it that for on with as was be by this are from at or have not but what all "
    "were when we there can which their said if do will each about how up out them then she many some so "
    "these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just "
    "where most know get through back much before go good new write our used me man too any day same "
    "right look think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number great tell "
    "men say small every found still between name should home big give air line set own under read last "
    "never us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head above kind "
    "began almost live page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes carefully answer question model revision correct "
    "wrong better minimal add sum reverse sort list letters digits numbers explain because therefore"
).split()


def builtin_corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    """Deterministic English-like text with digits and chat-style prompts, to train a tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"]))
    for _ in range(sentences // 10):
        # Digit-by-digit arithmetic, so a word-level vocabulary has a token per digit.
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        digits = lambda n, width: " ".join(f"{n:0{width}d}")  # noqa: E731
        lines.append(f"add: {digits(a, 3)} + {digits(b, 3)} answer: {digits(a + b, 4)}")
    return lines


def build_tokenizer(kind: str = "bpe", texts: list[str] | None = None, vocab_size: int = 1024):
    """A `PreTrainedTokenizerFast` with bos/eos/pad and rayalign's chat template.

    `bpe` is byte-level BPE (any text round-trips). `word` gives every whitespace-separated
    word its own token, for tasks that need one token per digit or word; unknown words map
    to <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else builtin_corpus()
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                            show_progress=False)
    else:
        raise ValueError(f"tokenizer kind must be 'bpe' or 'word', not {kind!r}")
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(preset: str | Preset, tokenizer, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized by the preset, deterministic for a seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset] if isinstance(preset, str) else preset
    config = LlamaConfig(
        vocab_size=max(p.vocab_size, len(tokenizer)),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        head_dim=p.hidden_size // p.num_heads,
        max_position_embeddings=p.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def init_model(out_dir: str | Path, preset: str = "tiny", tokenizer_kind: str = "bpe", seed: int = 0,
               texts: list[str] | None = None) -> Path:
    """Create a model and tokenizer in Hugging Face format under `out_dir`; returns the path."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(tokenizer_kind, texts, vocab_size=PRESETS[preset].vocab_size)
    model = build_model(preset, tokenizer, seed=seed)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "rayalign_model.json").write_text(
        json.dumps({"preset": preset, "tokenizer": tokenizer_kind, "seed": seed, "parameters": n_params}, indent=2)
    )
    return out
