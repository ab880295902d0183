"""Small byte-level BPE tokenizers trained locally, so tiny checkpoints need no downloads.

The vocabulary is learned from a fixed in-code corpus, so the same call always yields the same
tokenizer; the family's special tokens are appended after the learned tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

_CORPUS_LINES = (
    "You are a helpful assistant.",
    "Describe this image. What is in the picture? What happens in this video?",
    "The image shows a cat sitting on a red chair next to a window with green plants.",
    "A dog runs across the park while children play with a blue ball in the afternoon sun.",
    "There is a small boat on the lake, mountains in the background and clouds in the sky.",
    "The answer is yes. The answer is no. I am not sure what this is.",
    "user assistant system USER ASSISTANT: the of and to in is it that for on with as was",
    "one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10 100",
    "color shape size left right top bottom center person people car tree house road",
)


def train_byte_level_bpe(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` learned tokens, then `special_tokens` on top.

    Special tokens are added after training (not given to the trainer) so that they take the
    last ids, in the order given, whatever the trainer learned.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(list(_CORPUS_LINES) * 4, trainer=trainer)
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer
