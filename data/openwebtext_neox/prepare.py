"""OpenWebText tokenized with GPT-NeoX-20B (the RWKV-4 Pile models' tokenizer), both splits, for
config/eval_rwkv4_*.py: the same as `python data/openwebtext/prepare.py --tokenizer=neox`."""
import runpy
import sys
from pathlib import Path

sys.argv = [sys.argv[0], '--tokenizer=neox', *sys.argv[1:]]
runpy.run_path(str(Path(__file__).resolve().parents[1] / 'openwebtext' / 'prepare.py'), run_name='__main__')
