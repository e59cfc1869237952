"""Encoding only each text's first max_length words gives exactly the tokens of encoding it whole (WordPiece,
byte-level BPE, SentencePiece-style unigram), edge cases included."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from adafuse.fusion.backbone import BackboneConfig, load_tokenizer
from adafuse.tasks.builtin import load_builtin
from adafuse.tasks.tokenize import encode_prefixes, word_prefix

ARTICLES = load_builtin("bbc-topic5").splits["test"].texts[:150]
EDGES = [
    "",
    "one",
    "  leading and   inner   spaces\tand\nnewlines  ",
    "\u200b \u200b \u200b \u200b \u200b \u200b \u200b \u200b \u200b \u200b words after zero-width spaces " * 3,
    "\x00\x01 \x02 \x03 \x04 \x05 \x06 \x07 \x08 control characters dropped by normalisation " * 4,
    "Crème brûlée, naïve café — déjà vu; 東京 北京 " * 10,
    "averyveryverylongwordthatsplitsintomanypieces " * 20,
]


def trained(kind: str) -> PreTrainedTokenizerFast:
    if kind == "byte-level-bpe":  # GPT-2, Llama 3
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # "metaspace-unigram": T5, Llama 2 (SentencePiece)
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, unk_token="<unk>", special_tokens=["<unk>"])
    tokenizer.train_from_iterator(ARTICLES[:60], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>" if "unigram" in kind else None)


@pytest.fixture(scope="module", params=["wordpiece", "byte-level-bpe", "metaspace-unigram"])
def tokenizer(request):
    return load_tokenizer(BackboneConfig()) if request.param == "wordpiece" else trained(request.param)


@pytest.mark.parametrize("max_length", [4, 32, 128])
def test_prefix_encoding_equals_whole_encoding(tokenizer, max_length):
    texts = [*ARTICLES, *EDGES]
    whole = tokenizer(texts, truncation=True, max_length=max_length)
    assert encode_prefixes(tokenizer, texts, max_length) == whole


def test_word_prefix_cuts_at_the_word_boundary():
    assert word_prefix("a b  c\td e", 3) == "a b  c\t"
    assert word_prefix("a b c", 3) == "a b c"
    assert word_prefix("  a b", 1) == "  a "
