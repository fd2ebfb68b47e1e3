"""The library's shape: no import cycle, rules depend only on the protocols and their kit, no file over 400 lines,
and the decode loop syncs with the host once per step (GPU-readiness, checked on CPU by intercepting every tensor
operation that would wait for the device)."""
from __future__ import annotations

import ast
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import specdec
from drafters import JacobiDrafter, LookupDrafter, ModelDrafter, TreeModelDrafter
from specdec import Sampling
from verifiers import BoundedLanternRule, ExactRule, LanternRule
from helpers import perturbed_copy, tiny_gpt

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("specdec", "drafters", "verifiers")


# -- import graph ---------------------------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the library that `name` imports anywhere in its file (functions included)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:           # `import a.b.c` where c is a name: the deepest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_import_graph_checker_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(graph):
    assert "specdec.engine" in graph and graph["specdec.engine"]          # the walk found the library
    assert _cycles(graph) == []


def test_rules_import_only_the_protocols_and_their_kit(graph):
    # specdec.continuous: the distribution objects continuous rules read (their analogue of [V] vectors)
    allowed = {"specdec.protocols", "specdec.types", "specdec.random", "specdec.geometry", "specdec.continuous"}
    for name, deps in graph.items():
        if name.split(".")[0] != "verifiers":
            continue
        bad = {d for d in deps if d not in allowed and not d.startswith("verifiers")}
        assert not bad, f"{name} imports {sorted(bad)}"
        third_party = set()
        for node in ast.walk(ast.parse(_modules()[name].read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                third_party |= {r.split(".")[0] for r in roots}
        third_party -= set(sys.stdlib_module_names) | {"torch", "specdec", "verifiers"}
        assert not third_party, f"{name} imports {sorted(third_party)}"


def test_no_library_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, whitespace-folded text) of the lines that carry code: no blanks, comments, docstring-only
    lines, imports or lone punctuation."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = " ".join(line.split())
        if not s or s.startswith(("#", "import ", "from ", '"""', "@")) or s in (")", "]", "}", "):", "),"):
            continue
        out.append((i, s))
    return out


def test_no_block_of_six_lines_repeated_in_the_library():
    seen: dict[tuple[str, ...], str] = {}
    repeats = []
    for name, path in sorted(_modules().items()):
        lines = _code_lines(path)
        for j in range(len(lines) - 5):
            window = tuple(s for _, s in lines[j:j + 6])
            where = f"{path.relative_to(ROOT)}:{lines[j][0]}"
            if window in seen and not seen[window].startswith(f"{path.relative_to(ROOT)}:"):
                repeats.append(f"{where} repeats {seen[window]}")
            seen.setdefault(window, where)
    assert repeats == []


# -- host syncs per decode step ---------------------------------------------------------------------------------------
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy", "cuda",
           "masked_select", "unique", "unique_consecutive", "repeat_interleave", "argwhere"}


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """Records every tensor operation that waits for the device on CUDA: reading a value on the host (item,
    tolist, bool/int/float/index of a tensor), data-dependent shapes (nonzero, boolean-mask indexing, unique,
    masked_select), and transfers (.to(device), .cpu(), .cuda()). Markers split the record into decode steps."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []      # (kind, where) ; kind "sync:<op>" or a marker

    def mark(self, what: str) -> None:
        self.events.append((what, ""))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sync = name in SYNCING
        if name in ("__getitem__", "__setitem__"):
            sync = _bool_index(args)
        stack = traceback.extract_stack()[:-1]
        if name == "to":
            # a transfer written in this library counts even between CPU tensors (on a GPU it is a copy from the
            # host); inside a third-party model only a real device change counts (transformers' rotary tables
            # call .to(x.device) on a tensor already there, a no-op)
            dest = [torch.device(a) for a in (*args[1:], *kwargs.values()) if isinstance(a, (torch.device, str))]
            ours = str(ROOT) in stack[-1].filename
            sync = bool(dest) and (ours or any(d != args[0].device for d in dest))
        if sync:
            frames = [f for f in stack if str(ROOT) in f.filename and "/tests/" not in f.filename]
            where = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}" if frames else "?"
            self.events.append((f"sync:{name}", where))
        return func(*args, **kwargs)


def _count_per_step(target, run, compact_owner=None):
    """Run `run()` with the target's forward (one per decode step) and the cache compaction marked; return
    (syncs in each step between two target forwards, syncs inside compactions, number of compactions)."""
    counter = SyncCounter()
    forward, forward_tree = target.forward, target.forward_tree
    target.forward = lambda state, tokens: (counter.mark("step"), forward(state, tokens))[1]
    target.forward_tree = lambda state, *a: (counter.mark("step"), forward_tree(state, *a))[1]
    if compact_owner is not None:
        compact = compact_owner.compact

        def marked(state):
            counter.mark("compact<")
            compact(state)
            counter.mark("compact>")
        compact_owner.compact = marked
    try:
        with counter:
            run()
    finally:
        del target.forward, target.forward_tree
        if compact_owner is not None:
            del compact_owner.compact
    steps, in_compact, compactions, inside = [], 0, 0, False
    for kind, where in counter.events:
        if kind == "step":
            steps.append([])
        elif kind == "compact<":
            inside, compactions = True, compactions + 1
        elif kind == "compact>":
            inside = False
        elif inside:
            in_compact += 1
        elif steps:
            steps[-1].append(f"{kind} at {where}")
    return steps[:-1], in_compact, compactions      # the last segment holds the loop's exit and the read-out


def _assert_one_sync_per_step(steps):
    assert len(steps) >= 3
    bad = {i: s for i, s in enumerate(steps) if len(s) != 1}
    assert not bad, f"steps with other than one host sync: {dict(list(bad.items())[:2])}"


@pytest.mark.parametrize("make", [
    lambda t: (None, None),
    lambda t: (ModelDrafter(perturbed_copy(t, 0.3), k=3), ExactRule()),
    lambda t: (ModelDrafter(perturbed_copy(t, 0.3), k=3, drafts="argmax"), LanternRule(torch.randn(64, 4), 8)),
    lambda t: (ModelDrafter(perturbed_copy(t, 0.3), k=3), BoundedLanternRule(torch.randn(64, 4), 8, delta=0.2)),
    lambda t: (JacobiDrafter(window=6, init="random"), ExactRule()),
    lambda t: (JacobiDrafter(window=6, init="repeat_vertical"), ExactRule()),
    lambda t: (JacobiDrafter(window=6, init="repeat_vertical", coupling="maximal"), ExactRule()),
    lambda t: (LookupDrafter(k=3), ExactRule()),
    lambda t: (TreeModelDrafter(perturbed_copy(t, 0.3), "spine-3"), ExactRule()),
], ids=["ar", "model-exact", "argmax-lantern", "model-bounded", "jacobi-random", "jacobi-vertical", "mc-sjd",
        "lookup", "model-tree"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_own_model_paths_sync_once_per_step(target, make, cfg):
    drafter, rule = make(target)
    cond = torch.tensor([0, 1, 2])
    steps, _, _ = _count_per_step(target, lambda: specdec.generate(
        target, cond, drafter=drafter, rule=rule, sampling=Sampling(cfg_scale=cfg), seed=1, decode=False))
    _assert_one_sync_per_step(steps)


def test_counter_sees_a_planted_sync(target):
    drafter = ModelDrafter(perturbed_copy(target, 0.3), k=3)
    propose = drafter.propose
    drafter.propose = lambda k: (int(drafter.ctx.n_done[0]), propose(k))[1]      # a host read per step
    steps, _, _ = _count_per_step(target, lambda: specdec.generate(target, torch.tensor([0, 1]), drafter=drafter,
                                                                   seed=1))
    assert all(len(s) == 2 for s in steps) and any("__int__" in e for s in steps for e in s)
    drafter.propose = lambda k: (drafter.ctx.n_done.to("cpu"), propose(k))[1]       # a transfer per step
    steps, _, _ = _count_per_step(target, lambda: specdec.generate(target, torch.tensor([0, 1]), drafter=drafter,
                                                                   seed=1))
    assert all(len(s) == 2 for s in steps) and any("sync:to" in e for s in steps for e in s)


def _tiny_llama(hidden, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=128))


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_hf_path_syncs_once_per_step_plus_one_per_compaction(cfg):
    """The transformers path: one sync per step; compaction (every `compact_every` steps) adds at most one."""
    from specdec.adapters.hf_causal import HFCausalAdapter

    ids = torch.arange(8, 40)
    prompts = lambda c: [torch.tensor([1] * (1 + int(x)) + [2 + int(x)]) for x in c]   # noqa: E731
    target = HFCausalAdapter(_tiny_llama(64, 2, 0), ids, grid=(5, 5), uncond_prompt=torch.tensor([1, 6]),
                             class_prompts=prompts, compact_every=4)
    draft = HFCausalAdapter(_tiny_llama(32, 1, 1), ids, grid=(5, 5), uncond_prompt=torch.tensor([1, 6]),
                            class_prompts=prompts, compact_every=0)
    for drafter in (None, ModelDrafter(draft, k=3), JacobiDrafter(window=5)):
        steps, in_compact, compactions = _count_per_step(target, lambda: specdec.generate(
            target, torch.tensor([0, 1, 2]), drafter=drafter, sampling=Sampling(cfg_scale=cfg), seed=2),
            compact_owner=target)
        _assert_one_sync_per_step(steps)
        assert compactions >= 1 and in_compact <= compactions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_cuda_sync_debug_mode_counts_one_sync_per_step():
    target = tiny_gpt(vocab=64, grid=(4, 4), sharpen=3.0)
    target.model.cuda()
    drafter = ModelDrafter(perturbed_copy(target, 0.3), k=3)
    drafter.model.model.cuda()
    specdec.generate(target, torch.tensor([0, 1]), drafter=drafter, seed=0, decode=False)     # warm-up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = specdec.generate(target, torch.tensor([0, 1]), drafter=drafter, seed=0, decode=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= res.stats.steps + 8       # one per step, plus prefill and read-out
