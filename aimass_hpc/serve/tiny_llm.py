"""Build a tiny random-weight Llama in Hugging Face format, offline, in seconds.

For tests and the demo of ``aimass serve --engine vllm``::

    .venv-vllm/bin/python aimass_hpc/serve/tiny_llm.py OUT_DIR

2 layers, hidden size 64, 2 heads of head_dim 32 (vLLM's CPU attention needs >= 32), a
byte-level BPE tokenizer trained here on a few sentences (no download), saved with
``save_pretrained`` as safetensors, with a chat template. It needs ``transformers`` and
``tokenizers``, which the main environment does not have: run it with the vLLM environment's
Python (``scripts/setup-vllm``). The file imports nothing from ``aimass_hpc``, so it runs by
path in any environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONTEXT = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model repository stores versions of models on a parallel filesystem.",
    "Slurm schedules batch jobs on the nodes of a cluster.",
    "Hello, world! How are you today? 0123456789",
    "user assistant system: say something short.",
]


def build(out: str | Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write the tiny model into ``out`` (created) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=CONTEXT,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=CONTEXT,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python tiny_llm.py OUT_DIR  (needs transformers: .venv-vllm/bin/python)")
    print(build(sys.argv[1]))
