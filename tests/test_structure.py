"""The repository's shape: who imports whom."""
import ast
import runpy
import sys

from helpers import REPO

# a model file's front doors to the formats (from_pretrained, save_*) and to quantization, imported when called
DELEGATIONS = {('model_rwkv', 'interop'), ('model_gpt', 'interop')}


def repo_modules():
    """{module name: path} of the repository's importable modules (top level and wkv_cuda/)."""
    files = sorted(REPO.glob('*.py')) + sorted((REPO / 'wkv_cuda').glob('*.py'))
    names = {}
    for f in files:
        rel = f.relative_to(REPO).with_suffix('')
        name = '.'.join(rel.parts)
        names[name[:-len('.__init__')] if name.endswith('.__init__') else name] = f
    return names


def import_edges(modules):
    """{(importer, imported)} over the repository's modules, and which of them are inside a function (lazy)."""
    edges, lazy = set(), set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            else:
                continue
            for t in targets:
                if t in modules and t != name:
                    edges.add((name, t))
                    if id(node) not in top:
                        lazy.add((name, t))
    return edges, lazy


def cycle(edges):
    """A cycle of the directed graph as a list of modules, or None."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 'open':
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 'done'
        return None
    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle():
    modules = repo_modules()
    edges, lazy = import_edges(modules)
    assert ('interop', 'model_rwkv') in edges and ('train', 'interop') in edges  # the walk sees imports at all
    assert cycle(edges - lazy) is None, f"an import cycle at module level: {' -> '.join(cycle(edges - lazy))}"
    assert cycle(edges - DELEGATIONS) is None, f"an import cycle: {' -> '.join(cycle(edges - DELEGATIONS))}"


def test_model_files_import_torch_their_ops_and_shared_layers_only():
    modules = repo_modules()
    edges, lazy = import_edges(modules)
    shared = {'attention', 'moe', 'sampling', 'wkv_cuda', 'wkv_cuda.wkv5', 'wkv_cuda.wkv7'}
    for model in ('model_gpt', 'model_rwkv'):
        at_top = {b for a, b in edges - lazy if a == model}
        assert at_top <= shared, f"{model} imports {sorted(at_top - shared)} at module level"
        when_called = {b for a, b in lazy if a == model}
        assert when_called <= {'interop', 'quantize'}, f"{model} imports {sorted(when_called)} in its methods"
    # every model file is written one way (files.py); train.py's own checkpoints know nothing of other programs'
    # files; quantize.py knows no model
    assert {('checkpoint', 'files'), ('interop', 'files')} <= edges
    assert not {b for a, b in edges if a == 'checkpoint'} & {'interop', 'quantize'}
    assert not {b for a, b in edges if a == 'quantize'} & {'model_gpt', 'model_rwkv', 'checkpoint', 'interop'}


SCRIPTS = ['train.py', 'sample.py', 'export.py', 'benchmark_inference_time.py', 'assets/make_animations.py',
           'data/shakespeare_char/prepare.py', 'data/shakespeare/prepare.py', 'data/openwebtext/prepare.py',
           'data/openwebtext_neox/prepare.py', 'data/tinystories/prepare.py', 'data/instruct/prepare.py'] + \
    [f'benchmarks/{f.name}' for f in sorted((REPO / 'benchmarks').glob('bench_*.py'))]


def option_names(name):
    """The keys of a script's OPTIONS (the data scripts': DOCUMENT_OPTIONS), its module run without __main__."""
    module = runpy.run_path(str(REPO / name))
    return set(module.get('OPTIONS') or module['DOCUMENT_OPTIONS'])


def cfg_reads(path):
    return {n.attr for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == 'cfg'}


def test_every_script_reads_the_options_it_documents_and_documents_what_it_reads(monkeypatch):
    """--help prints OPTIONS (configurator.usage); here each documented option is one the script (or data/common.py,
    for the dataset scripts) reads as cfg.<key>, and each cfg.<key> it reads is documented."""
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the data scripts put the repository root on it
    assert len(SCRIPTS) >= 19
    for name in SCRIPTS:
        path = REPO / name
        options = option_names(name)
        assert options, f"{name} has no OPTIONS"
        documents = 'DOCUMENT_OPTIONS' in path.read_text()  # the script hands its cfg to data/common.py
        reads = cfg_reads(path) | (cfg_reads(REPO / 'data' / 'common.py') if documents else set())
        assert options <= reads, f"{name} documents options it never reads: {sorted(options - reads)}"
        assert reads <= options, f"{name} reads options it does not document: {sorted(reads - options)}"


def test_pyproject_installs_every_module_with_requirements_txt_dependencies():
    # `pip install -e .` (and a wheel) must carry every top-level module, the kernels' sources and the same
    # dependencies as requirements.txt, so that a module added later is not importable only from the repository root
    import fnmatch
    import re
    import tomllib
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())
    setup = project['tool']['setuptools']
    assert sorted(setup['py-modules']) == sorted(f.stem for f in REPO.glob('*.py'))
    assert sorted(setup['packages']) == sorted(p.parent.name for p in REPO.glob('*/__init__.py'))
    patterns = setup['package-data']['wkv_cuda']
    sources = [f.relative_to(REPO / 'wkv_cuda').as_posix() for f in (REPO / 'wkv_cuda').rglob('*')
               if f.is_file() and f.suffix != '.py' and '__pycache__' not in f.parts]
    assert sources and [s for s in sources if not any(fnmatch.fnmatch(s, p) for p in patterns)] == []
    pinned = [re.sub(r'\s*#.*', '', line).strip() for line in (REPO / 'requirements.txt').read_text().splitlines()]
    declared = project['project']['dependencies'] + project['project']['optional-dependencies']['test']
    assert sorted(p for p in pinned if p) == sorted(declared)


def test_every_default_output_is_git_ignored():
    # a run with default options never dirties the checkout: checkpoints, benchmark tables and figures land in
    # git-ignored folders unless a path is named
    import subprocess
    outputs = []
    for name in SCRIPTS:
        module = runpy.run_path(str(REPO / name))
        options = module.get('OPTIONS') or module['DOCUMENT_OPTIONS']
        outputs += [(name, key, options[key].default.format(device='cpu')) for key in ('out', 'plot', 'out_dir')
                    if key in options and options[key].default and name != 'sample.py']  # sample.py's is its input
    assert len(outputs) >= 5
    for name, key, path in outputs:
        inside = f'{path}/ckpt.pt' if key == 'out_dir' else path  # a file written there
        ignored = subprocess.run(['git', 'check-ignore', '-q', '--no-index', inside], cwd=REPO).returncode == 0
        assert ignored, f"{name}: the default {key}={path!r} is not git-ignored"
