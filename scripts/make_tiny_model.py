#!/usr/bin/env python
"""Build a tiny, deterministic Llama model that vLLM can serve on a CPU.

    python scripts/make_tiny_model.py OUT_DIR

No model hub is reachable here, so the model is made locally:

* ``LlamaForCausalLM`` with random weights under a fixed seed (hidden 128,
  2 layers, 4 heads, head_dim 32 -- vLLM's CPU attention rejects head size 16),
  saved as safetensors (about 5 MB);
* a byte-level BPE tokenizer trained on the spot with ``tokenizers`` on a fixed,
  sorted list of CPython standard-library sources, wrapped as
  ``PreTrainedTokenizerFast`` with bos/eos/pad tokens and a ChatML-like
  ``chat_template``;
* ``generation_config.json``.

Running it twice gives byte-identical files (same venv, same CPython 3.11).
The generated text is nonsense, but the protocol around it is real.

Needs torch, transformers and tokenizers: run it with the vLLM venv's python
(``scripts/vllm_cpu.py`` does that for you).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

# Keep the tokenizer trainer single-threaded and quiet: deterministic merges.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234

HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
HEAD_DIM = 32
INTERMEDIATE_SIZE = 256
VOCAB_SIZE = 4096
MAX_POSITION_EMBEDDINGS = 512

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]  # ids 0..4

# ChatML-like; the bos token comes from the template (chat prompts are tokenized
# without special tokens), plain completions get it from the post-processor.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | map(attribute='text') | join('') %}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Old, rarely touched stdlib modules: the tokenizer's training text. Sorted, fixed.
CORPUS_FILES = sorted(
    [
        "bisect.py",
        "colorsys.py",
        "copy.py",
        "difflib.py",
        "fnmatch.py",
        "graphlib.py",
        "heapq.py",
        "keyword.py",
        "numbers.py",
        "sched.py",
        "secrets.py",
        "string.py",
        "stringprep.py",
        "textwrap.py",
        "this.py",
    ]
)
# sha256 of the joined corpus as read on CPython 3.11.7; another patch release
# may differ slightly (then the vocabulary differs, nothing else breaks).
REFERENCE_CORPUS_SHA256 = "fa82b0ab8a195024926d1f47445ae0cfc59b2d063a117052c1af9a94e499a231"


def read_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in CORPUS_FILES:
        raw = (stdlib / name).read_bytes().replace(b"\r\n", b"\n")
        texts.append(raw.decode("utf-8"))
    return texts


def corpus_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_tokenizer(texts: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer):  # -> LlamaForCausalLM
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids[IM_END]],
        pad_token_id=ids[PAD_TOKEN],
        max_length=MAX_POSITION_EMBEDDINGS,
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    args = parser.parse_args(argv)

    texts = read_corpus()
    digest = corpus_sha256(texts)
    if digest != REFERENCE_CORPUS_SHA256:
        print(
            f"note: tokenizer corpus sha256 {digest} differs from the reference "
            f"(CPython {sys.version.split()[0]}); the vocabulary will differ slightly",
            file=sys.stderr,
        )

    tokenizer = build_tokenizer(texts)
    if len(tokenizer) > VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens > vocab size {VOCAB_SIZE}")
    model = build_model(tokenizer)

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in sorted(out.iterdir()):
        print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
