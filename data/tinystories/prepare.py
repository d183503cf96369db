"""
TinyStories (Eldan & Li 2023, roneneldan/TinyStories on the Hugging Face hub; the dataset MicroRWKV trains on),
tokenized: train.bin / val.bin from its own train and validation splits, uint16, one <|endoftext|> after every story,
and meta.json. The same streaming, pooled tokenizer as data/openwebtext/prepare.py, whose options it takes:

$ python data/tinystories/prepare.py                        # GPT-2 BPE -> data/tinystories/
$ python data/tinystories/prepare.py --tokenizer=neox       # -> data/tinystories_neox/
"""
import importlib.util
import sys
from pathlib import Path

# openwebtext's prepare.py as a named module (its worker function must be importable by the process pool)
spec = importlib.util.spec_from_file_location('openwebtext_prepare',
                                              Path(__file__).resolve().parents[1] / 'openwebtext' / 'prepare.py')
owt = sys.modules['openwebtext_prepare'] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(owt)

if __name__ == '__main__':
    try:
        owt.main(sys.argv[1:], hub_name='roneneldan/TinyStories', name='tinystories',
                 hub_splits={'train': 'train', 'val': 'validation'})
    except owt.ConfigError as e:
        sys.exit(f"prepare.py: error: {e}")
