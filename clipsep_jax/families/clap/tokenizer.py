"""The text side of a CLAP trained here: a byte-level RoBERTa tokenizer without merges, and the
caption token tables training and evaluation read.

The tokenizer is RoBERTa's byte-level BPE with an empty merge list: every UTF-8 byte of a caption
is one token (GPT-2's byte-to-character map), wrapped as ``<s> ... </s>`` and padded with
``<pad>``. Its 261 ids are ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the 256 byte
characters in code-point order (4-259) and ``<mask>`` 260, so ``pad_token_id`` is RoBERTa's 1,
which the text tower's position numbering assumes. Having no merges, it depends on no data: the
same tokenizer serves every dataset, the demo downloads nothing, and a trained model needs only
its config and weights (:func:`clipsep_jax.families.clap.trained.save_trained_clap` writes the
files beside them all the same, for ``AutoTokenizer``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from clipsep_jax.encoders.clap import TEXT_LENGTH

__all__ = ["BYTE_VOCAB_SIZE", "PAD_TOKEN_ID", "byte_tokenizer", "text_length", "tokenize"]

_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
PAD_TOKEN_ID = 1
BYTE_VOCAB_SIZE = len(_SPECIALS) + 256 + 1  # with <mask>


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The byte-level RoBERTa tokenizer without merges (see the module docs); 261 ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*_SPECIALS, *alphabet, "<mask>"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0),
                                                       add_prefix_space=False)
    return transformers.RobertaTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=TEXT_LENGTH)


def text_length(max_position_embeddings: int) -> int:
    """Tokens per caption: :class:`clipsep_jax.encoders.clap.CLAP`'s padded length (77, or what
    RoBERTa's positions leave after the padding id)."""
    return min(TEXT_LENGTH, max_position_embeddings - PAD_TOKEN_ID - 1)


def tokenize(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (token ids, attention mask), int32 [len(texts), length], padded and truncated as
    :meth:`clipsep_jax.encoders.clap.CLAP.tokenize` does."""
    tokens = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                       return_tensors="np")
    return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
