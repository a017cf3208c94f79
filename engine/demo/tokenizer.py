"""The demo's byte-level tokenizer.

Ids 0-255 are the 256 bytes (id == byte value), so any UTF-8 text round-trips; ids 256-260 are the
specials. The chat template renders every turn as `<|role|>content<|end|>`; the generation prompt
is `<|assistant|>`, so a rendered prompt with the generation prompt is an exact prefix of the same
conversation with the assistant turn appended, and the completion renders as `content<|end|>`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
EOS = "<|end|>"
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
SPECIALS = [PAD, EOS, ROLE_TOKENS["user"], ROLE_TOKENS["assistant"], ROLE_TOKENS["system"]]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_vocab() -> dict[str, int]:
    # The ByteLevel pre-tokenizer maps each byte to one printable unicode character; order the
    # vocabulary so that a byte's id is its value.
    mapping: dict[int, str] = {}
    # Rebuild the GPT-2 byte->unicode table (printable bytes map to themselves, the rest shift up).
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    shift = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    assert set(mapping.values()) == alphabet, "byte alphabet mismatch"
    return {ch: b for b, ch in mapping.items()}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level fast tokenizer with the demo's specials and chat template."""
    tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=64,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
