"""
OpenWebText tokenized with GPT-NeoX-20B (the RWKV-4 Pile models' tokenizer), both splits, for
config/eval_rwkv4_*.py: the same as `python data/openwebtext/prepare.py --tokenizer=neox`, whose options it takes.

$ python data/openwebtext_neox/prepare.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import Option, parse_config, run_script  # noqa: E402
from data.common import DOCUMENT_OPTIONS, prepare_documents  # noqa: E402

OPTIONS = {**DOCUMENT_OPTIONS, 'tokenizer': Option('neox', "GPT-NeoX-20B, as the RWKV-4 Pile models read")}


def main(argv):
    prepare_documents(parse_config(OPTIONS, argv, __doc__), 'Skylion007/openwebtext', 'openwebtext')


if __name__ == '__main__':
    run_script(main)
