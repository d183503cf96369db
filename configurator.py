"""
The configuration of every script, nanoGPT's configurator.py grown by what users asked of it: each script declares
its options once, as {name: Option(default, help, allowed)}; a config file (plain Python assignments) and then
`--key=value` arguments override the defaults, in order:

$ python train.py config/train_shakespeare_char.py --batch_size=32

Every value is checked before the script does anything: an unknown key names the closest known one, an int may stand
for a float and any other type mismatch is an error, and each value must lie in its option's `allowed` set (choices,
an interval such as '>= 1' or '[0, 1)', or a regular expression). Errors are a ConfigError of one line; scripts print
it as `<script>: error: <message>`. This module imports no torch, so data scripts can use it.
"""
import ast
import builtins
import difflib
import re
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple


class ConfigError(ValueError):
    """A setting that cannot work; its message is one line that says what to do."""


class Option(NamedTuple):
    default: object
    help: str
    allowed: object = None  # None, a tuple of choices, an interval string like '>= 1' or '(0, 1]', or an re.Pattern


INTERVAL = re.compile(r'\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*')
BOUND = re.compile(r'\s*(>=|>|<=|<)\s*(\S+)\s*')


def allows(allowed, value):
    """Whether `value` (a scalar) is in `allowed`."""
    if allowed is None:
        return True
    if isinstance(allowed, tuple):
        return value in allowed
    if isinstance(allowed, re.Pattern):
        return isinstance(value, str) and allowed.fullmatch(value) is not None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if m := INTERVAL.fullmatch(allowed):
        lo, hi = float(m[2]), float(m[3])
        return (lo <= value if m[1] == '[' else lo < value) and (value <= hi if m[4] == ']' else value < hi)
    op, bound = BOUND.fullmatch(allowed).groups()
    return {'>=': value >= float(bound), '>': value > float(bound), '<=': value <= float(bound),
            '<': value < float(bound)}[op]


def describe(allowed):
    if isinstance(allowed, tuple):
        return 'one of ' + ', '.join(repr(a) for a in allowed)
    if isinstance(allowed, re.Pattern):
        return f'a string matching {allowed.pattern}'
    return allowed if INTERVAL.fullmatch(allowed) is None else f'in {allowed.strip()}'


def leaves(value):
    """The scalars of a value: itself, or every element of a (nested) list or tuple."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def check_value(options, key, value, origin):
    """The value to store for `key` (ints promoted to float where a float is expected); ConfigError otherwise."""
    if key not in options:
        close = difflib.get_close_matches(key, list(options), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"unknown config key '{key}' in {origin}{hint}")
    option = options[key]
    want = type(option.default)
    if want is float and type(value) is int:
        value = float(value)  # an int may stand for a float
    if want is str and type(value) in (int, float):
        value = f'{value:g}'  # and a number for a string: --rwkv_version=7 is '7'
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' in {origin} expects {want.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    for leaf in leaves(value):
        if not allows(option.allowed, leaf):
            raise ConfigError(f"{key}={value!r} (from {origin}) is not allowed: {key} must be "
                              f"{describe(option.allowed)}")
    return value


def usage(doc, options):
    """A script's --help: its docstring, then every option with its default, what it does and what it allows."""
    lines = [doc.strip(), '', 'options, as --key=value (or in a config file as key = value):']
    for key, option in options.items():
        allowed = f' [{describe(option.allowed)}]' if option.allowed is not None else ''
        lines.append(f'  {key} = {option.default!r}  # {option.help}{allowed}')
    return '\n'.join(lines)


def read_config_file(path):
    """The assignments of a config file, run as Python; any error in it is one line with its line number."""
    try:
        code = builtins.compile(path.read_text(), str(path), 'exec')
        namespace = {}
        exec(code, namespace)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: {e.msg}; it must be plain Python assignments")
    except Exception as e:  # whatever the file's own code raised: say where in the file
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == str(path)),
                    '?')
        raise ConfigError(f"config file {path} line {line}: {type(e).__name__}: {e}")
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, type(sys))}


def parse_config(options, argv, doc, given=None):
    """The options' defaults updated by config files and --key=value arguments in argv, in order, as a namespace.
    -h / --help prints usage(doc, options) and exits. `given`, a set, collects the keys that were set."""
    given = set() if given is None else given
    if any(arg in ('-h', '--help') for arg in argv):
        print(usage(doc, options))
        raise SystemExit(0)
    config = {key: option.default for key, option in options.items()}
    for arg in argv:
        if not arg.startswith('--'):
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"config file {arg} not found (expected a file like config/train_shakespeare_char.py"
                                  f" or --key=value)")
            for key, value in read_config_file(path).items():
                config[key] = check_value(options, key, value, arg)
                given.add(key)
        else:
            key, sep, raw = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f"argument {arg} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare word is a string
            config[key] = check_value(options, key, value, f"--{key}")
            given.add(key)
    return SimpleNamespace(**config)


def fill_path(key, template, **fields):
    """An output path option with {placeholders} filled in, checked before any work: an unknown placeholder is a
    one-line error rather than a KeyError after a long benchmark."""
    try:
        return Path(template.format(**fields))
    except (KeyError, IndexError, ValueError) as e:
        known = ', '.join('{' + f + '}' for f in fields) or 'none'
        raise ConfigError(f"{key}={template!r}: cannot fill in its placeholders ({type(e).__name__}: {e}); the "
                          f"known ones are {known} (write {{{{ and }}}} for a literal brace)") from e


def run_script(main):
    """A script's entry point: main(sys.argv[1:]); a ConfigError ends it with one line, `<script>: error: <message>`,
    and exit status 1 (never a traceback)."""
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
