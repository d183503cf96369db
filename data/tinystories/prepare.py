"""
TinyStories (Eldan & Li 2023, roneneldan/TinyStories on the Hugging Face hub; the dataset MicroRWKV trains on),
tokenized: train.bin / val.bin from its own train and validation splits, uint16, one <|endoftext|> after every story,
and meta.json. The same streaming, pooled tokenizer as data/openwebtext/prepare.py, with the same options:

$ python data/tinystories/prepare.py                        # GPT-2 BPE -> data/tinystories/
$ python data/tinystories/prepare.py --tokenizer=neox       # -> data/tinystories_neox/
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import parse_config, run_script  # noqa: E402
from data.common import DOCUMENT_OPTIONS, prepare_documents  # noqa: E402


def main(argv):
    prepare_documents(parse_config(DOCUMENT_OPTIONS, argv, __doc__), 'roneneldan/TinyStories', 'tinystories',
                      hub_splits={'train': 'train', 'val': 'validation'})


if __name__ == '__main__':
    run_script(main)
