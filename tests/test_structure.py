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
           'data/openwebtext_neox/prepare.py', 'data/tinystories/prepare.py'] + \
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
