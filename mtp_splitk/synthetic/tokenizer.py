# Copyright © 2026 mtp_splitk contributors

"""The synthetic models' tokenizer, built in code (no network, no files).

A byte-level BPE trained on a few sentences and padded to the model's
vocabulary with word-like filler tokens, so any sampled id decodes to text;
ChatML special tokens at the end of the vocabulary, as in Qwen's.
"""

import json
from typing import List

# The vocabulary of the tiny and small models (and the default here).
TINY_VOCAB = 384

# ChatML: one role line per message; <|im_end|> is the eos token.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog while the small model writes tokens. "
    "Speculative decoding drafts a few tokens with a cheap model and verifies all of "
    "them with one pass of the large model; the tokens that agree are kept. "
    "A quantized matrix multiply streams packed weights, dequantizes them in registers "
    "and multiplies them with a handful of rows. Hello, world! How are you today? "
    "We split the reduction along K so that every streaming multiprocessor has work. "
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation: , . ; : ! ? ( ) [ ] "
)
_BPE_VOCAB_CAP = 512  # merges learned from the corpus; the rest of the vocabulary is filler


def _filler_tokens(count: int, taken) -> List[str]:
    """Word-like byte-level tokens ("Ġbaku", ...) that no merge produces."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    tokens, i = [], 0
    while len(tokens) < count:
        word, n = "", i
        while True:
            word += syllables[n % len(syllables)]
            n //= len(syllables)
            if n == 0:
                break
        i += 1
        token = "Ġ" + word  # "Ġ" is the byte-level form of a leading space
        if token not in taken:
            tokens.append(token)
    return tokens


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` tokens.

    Byte-level BPE (every string encodes), special tokens at the end of the
    vocabulary as in Qwen's, a ChatML chat template, eos ``<|im_end|>``.
    Deterministic: the same vocab_size gives the same tokenizer.json.
    """
    # Lazy: transformers takes a second to import, and the CLI imports this package.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base_size = vocab_size - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(base_size, _BPE_VOCAB_CAP),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)

    # Fill the vocabulary up to the model's size. The filler entries are plain
    # vocabulary (no merge produces them), so they decode but never encode.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for token in _filler_tokens(base_size - len(vocab), vocab):
        vocab[token] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    assert tok.get_vocab_size() == vocab_size

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
