"""configurator.py: config files and --key=value in order, types, allowed values, errors of one line."""
import re

import pytest

from configurator import ConfigError, Option, allows, parse_config

OPTIONS = dict(
    batch_size=Option(12, "micro-batch", '>= 1'),
    learning_rate=Option(6e-4, "peak", '> 0'),
    min_lr=Option(6e-5, "floor", '>= 0'),
    dropout=Option(0.0, "p", '[0, 1)'),
    top_p=Option(1.0, "nucleus", '(0, 1]'),
    compile=Option(False, "torch.compile"),
    model_type=Option('rwkv', "the model", ('rwkv', 'gpt')),
    device=Option('auto', "where", re.compile(r'auto|cpu|cuda(:\d+)?')),
    sizes=Option([(1, 2)], "pairs", '>= 1'),
    n_embd=Option(768, "width", '>= 1'),
    dataset=Option('openwebtext', "name"),
)


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("import math\nbatch_size = 4\nlearning_rate = 1  # an int may stand for a float\n"
                   "model_type = 'gpt'\n")
    given = set()
    c = parse_config(OPTIONS, [str(cfg), '--batch_size=8', '--min_lr=0', '--compile=True', '--dataset=foo',
                               '--sizes=[(3, 4), (5, 6)]'], 'doc', given)
    assert c.batch_size == 8 and c.model_type == 'gpt' and c.dataset == 'foo' and c.compile is True
    assert c.learning_rate == 1.0 and type(c.learning_rate) is float and type(c.min_lr) is float
    assert c.sizes == [(3, 4), (5, 6)]
    assert given == {'batch_size', 'learning_rate', 'model_type', 'min_lr', 'compile', 'dataset', 'sizes'}
    assert OPTIONS['batch_size'].default == 12  # the defaults are not modified


@pytest.mark.parametrize('argv,fragment', [
    (['--learnig_rate=1e-3'], "unknown config key 'learnig_rate' in --learnig_rate; did you mean 'learning_rate'?"),
    (['--batch_size=1.5'], "config key 'batch_size' in --batch_size expects int, got 1.5 (float)"),
    (['--compile=yes'], "expects bool, got 'yes'"),
    (['--batch_size'], 'must look like --key=value'),
    (['config/does_not_exist.py'], 'config file config/does_not_exist.py not found'),
    (['--batch_size=0'], "batch_size=0 (from --batch_size) is not allowed: batch_size must be >= 1"),
    (['--learning_rate=0'], "learning_rate must be > 0"),
    (['--min_lr=-1e-5'], "min_lr must be >= 0"),
    (['--dropout=1.0'], "dropout must be in [0, 1)"),
    (['--top_p=0'], "top_p must be in (0, 1]"),
    (['--model_type=lstm'], "model_type must be one of 'rwkv', 'gpt'"),
    (['--device=gpu'], r"device must be a string matching auto|cpu|cuda(:\d+)?"),
    (['--sizes=[(1, 0)]'], "sizes must be >= 1"),
])
def test_config_errors(argv, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config(OPTIONS, argv, 'doc')
    assert fragment in str(e.value) and '\n' not in str(e.value)


def test_intervals():
    assert allows('[0, 1)', 0) and allows('[0, 1)', 0.999) and not allows('[0, 1)', 1) and not allows('[0, 1)', -1e-9)
    assert allows('(0, 1]', 1) and not allows('(0, 1]', 0)
    assert allows('>= 1', 1) and not allows('>= 1', 0) and allows('> 0', 1e-12) and not allows('> 0', 0)
    assert not allows('>= 0', True)  # a bool is not a number here
    assert allows(('a', 'b'), 'a') and not allows(('a', 'b'), 'c')


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("n_embed = 128\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'n_embed' in .*cfg.py; did you mean 'n_embd'\?"):
        parse_config(OPTIONS, [str(cfg)], 'doc')


@pytest.mark.parametrize('text,fragment', [
    ("batch_size = 4\nlearning_rate = (1e-3\n", "line 2: '(' was never closed"),
    ("batch_size = 4\n\nn_embd = 3 * undefined_name\n", "line 3: NameError: name 'undefined_name' is not defined"),
])
def test_config_file_that_does_not_run(tmp_path, text, fragment):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(OPTIONS, [str(cfg)], 'doc')
    assert f'config file {cfg} {fragment}' in str(e.value) and '\n' not in str(e.value)


def test_help_prints_doc_and_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(OPTIONS, ['--help'], 'The docstring.')
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('The docstring.\n')
    for key, option in OPTIONS.items():
        assert f'  {key} = {option.default!r}  # {option.help}' in out
    assert "  batch_size = 12  # micro-batch [>= 1]" in out
