"""The class-level patch: coverage of mlx / mlx-lm's quantized matmuls,
reversibility, and bit-identical models on the CPU (where the ops fall back)."""

import ast
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step, speculative_generate_step, stream_generate
from mlx_lm.models import mla, switch_layers
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

import mtp_splitk
from mtp_splitk import ops, patch, synthetic

SITE_PACKAGES = Path(mlx_lm.__file__).resolve().parents[1]
QUANTIZED_MATMULS = ("quantized_matmul", "gather_qmm")
# Families whose caches can be trimmed, which mlx-lm's speculative loop needs
# (qwen3_next and qwen3_5 keep recurrent state: mtp_splitk.speculative rolls
# those back itself).
SPECULATIVE = [f for f in synthetic.FAMILIES if f not in ("qwen3_next", "qwen3_5")]
PROMPT = mx.array(list(range(5, 45)))  # 40 tokens x top-2 experts >= 64: SwitchGLU sorts


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {f: synthetic.write_model(root / f, f) for f in synthetic.FAMILIES}
    dirs["draft"] = synthetic.write_model(root / "draft", "llama", seed=1)
    # mlx-lm's DeepSeek-V3 attention takes a different (absorbed) path for one
    # token than for several, so decode and verify logits differ by rounding;
    # in bfloat16 that flips near-ties in greedy decoding with or without the
    # patch. float32 shrinks the difference to ~1e-6.
    dirs["deepseek_v3_f32"] = synthetic.write_model(
        root / "deepseek_v3_f32", "deepseek_v3", dtype="float32"
    )
    return dirs


_models = {}


def load(path):
    if path not in _models:
        _models[path] = mlx_lm.load(str(path))
    return _models[path]


@pytest.fixture
def spy(monkeypatch):
    """Records every call that reaches mtp_splitk.ops (the patched methods
    look the ops up on the module at call time). After ops.clear_cache(),
    every layer's first call of each input shape does."""
    calls = []
    ops.clear_cache()

    def recording(op):
        original = getattr(ops, op)

        def wrapper(x, w, *args, **kwargs):
            calls.append((op, id(w), kwargs.get("sorted_indices")))
            return original(x, w, *args, **kwargs)

        monkeypatch.setattr(ops, op, wrapper)

    for op in QUANTIZED_MATMULS:
        recording(op)
    return calls


def forward(model):
    """Logits of a 40-token prefill and of one decode step after it."""
    cache = make_prompt_cache(model)
    prefill = model(PROMPT[None], cache=cache)
    decode = model(mx.array([[7]]), cache=cache)
    mx.eval(prefill, decode)
    return prefill, decode


# -- the patch as an object ----------------------------------------------------------------


def test_enable_disable_restores_the_original_objects():
    originals = {(cls, name): vars(cls)[name] for cls, name, _ in patch.PATCHES}
    assert not patch.is_enabled()

    patch.enable()
    for cls, name, replacement in patch.PATCHES:
        installed = getattr(cls, name)  # the replacement inside its router
        assert installed.__wrapped__ is replacement
        assert installed.original is originals[(cls, name)]
    patch.enable()  # idempotent: the originals are not overwritten with the replacements
    assert patch._originals == originals

    patch.disable()
    for (cls, name), original in originals.items():
        assert getattr(cls, name) is original
        assert vars(cls)[name] is original
    patch.disable()  # harmless when disabled
    assert all(vars(cls)[name] is fn for (cls, name), fn in originals.items())


def test_enabled_context_restores_the_previous_state():
    with mtp_splitk.enabled():
        assert nn.QuantizedLinear.__call__.__wrapped__ is patch._quantized_linear_call
        with mtp_splitk.enabled():
            pass
        assert patch.is_enabled()  # the inner block did not switch it off
    assert not patch.is_enabled()

    mtp_splitk.enable()
    with mtp_splitk.enabled():
        pass
    assert patch.is_enabled()  # enabled before the block, still enabled after
    with mtp_splitk.enabled(False):
        assert not patch.is_enabled()  # enabled(False): the block runs unpatched
    assert patch.is_enabled()  # and the patch comes back after it
    mtp_splitk.disable()

    with pytest.raises(RuntimeError):
        with mtp_splitk.enabled():
            raise RuntimeError
    assert not patch.is_enabled()


def test_help_lists_the_package_api():
    """help(mtp_splitk) shows the ops, the patch switches and the split
    policy; importing the package alone still leaves mlx_lm unloaded."""
    script = (
        "import sys, pydoc, mtp_splitk\n"
        "print('mlx_lm' in sys.modules)\n"
        "print(pydoc.render_doc(mtp_splitk, renderer=pydoc.plaintext))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded, text = result.stdout.split("\n", 1)
    assert loaded == "False"
    functions = text[text.index("FUNCTIONS") : text.index("DATA")]
    api = ("enable", "disable", "enabled", "is_enabled", "quantized_matmul", "gather_qmm")
    api += ("split", "set_split")
    assert set(api) <= set(mtp_splitk.__all__)
    for name in api:
        assert re.search(rf"^    {name}\(", functions, re.M), name
    assert "mtp_splitk.enable()" in text  # the package docstring says how to use it


def _body(function, swap: bool) -> str:
    """The function's arguments and body as a syntax tree, docstring dropped;
    with ``swap``, mx.quantized_matmul / mx.gather_qmm calls are ops.* calls
    given ``derivatives=self.training``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    body = tree.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]

    class Swap(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr in QUANTIZED_MATMULS
                and isinstance(f.value, ast.Name)
                and f.value.id == "mx"
            ):
                f.value.id = "ops"
                training = ast.parse("self.training", mode="eval").body
                node.keywords.append(ast.keyword(arg="derivatives", value=training))
            return node

    module = ast.Module(body=body, type_ignores=[])
    if swap:
        module = Swap().visit(module)
    return ast.dump(tree.args) + ast.dump(module)


@pytest.mark.parametrize(
    "cls,name,replacement", patch.PATCHES, ids=lambda p: getattr(p, "__name__", None)
)
def test_replacements_are_the_originals_with_the_op_swapped(cls, name, replacement):
    """If mlx or mlx-lm changes one of these methods, this fails: the patch
    would otherwise replace new logic with a stale copy."""
    original = vars(cls)[name]
    assert _body(replacement, swap=False) == _body(original, swap=True)
    assert "ops" in _body(replacement, swap=False)


def _call_sites():
    """(file relative to site-packages, enclosing qualified name) of every
    call of quantized_matmul / gather_qmm in the installed mlx and mlx_lm."""
    sites = []
    # mlx is a namespace package: its core module says where it is installed.
    roots = [Path(mx.__file__).resolve().parent, Path(mlx_lm.__file__).resolve().parent]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            relative = path.relative_to(SITE_PACKAGES).as_posix()

            def visit(node, scope):
                for child in ast.iter_child_nodes(node):
                    if isinstance(
                        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
                    ):
                        visit(child, scope + [child.name])
                        continue
                    if isinstance(child, ast.Call):
                        func = child.func
                        called = getattr(func, "attr", getattr(func, "id", None))
                        if called in QUANTIZED_MATMULS:
                            sites.append((relative, ".".join(scope), child.lineno))
                    visit(child, scope)

            visit(tree, [])
    return sites


def test_every_quantized_matmul_call_site_is_covered():
    sites = _call_sites()
    covered = {
        (
            Path(inspect.getsourcefile(vars(cls)[name]))
            .resolve()
            .relative_to(SITE_PACKAGES)
            .as_posix(),
            vars(cls)[name].__qualname__,
        )
        for cls, name, _ in patch.PATCHES
    }
    uncovered = [
        f"{file}:{line} in {scope}"
        for file, scope, line in sites
        if (file, scope) not in covered and (file, scope) not in patch.OUT_OF_SCOPE
    ]
    assert not uncovered, "quantized matmuls neither patched nor in patch.OUT_OF_SCOPE"
    found = {(file, scope) for file, scope, _ in sites}
    assert covered <= found  # the scan sees what the patch replaces
    stale = set(patch.OUT_OF_SCOPE) - found
    assert not stale, "OUT_OF_SCOPE names call sites that no longer exist"
    assert all(len(reason) > 40 for reason in patch.OUT_OF_SCOPE.values())


# -- models --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_patched_model_is_bit_identical_and_every_quantized_matmul_goes_through_ops(
    model_dirs, family, spy
):
    model, _ = load(model_dirs[family])
    expected = forward(model)
    assert not spy

    with mtp_splitk.enabled():
        patched = forward(model)
    for a, b in zip(expected, patched):
        assert a.dtype == b.dtype and mx.array_equal(a, b)

    layers = [m for _, m in model.named_modules()]
    matmuls = (
        nn.QuantizedLinear,
        switch_layers.QuantizedSwitchLinear,
        mla.QuantizedMultiLinear,
    )
    weights = {id(m["weight"]) for m in layers if isinstance(m, matmuls)}
    embeddings = {id(m["weight"]) for m in layers if isinstance(m, nn.QuantizedEmbedding)}
    seen = {w for _, w, _ in spy}
    assert weights <= seen  # every quantized layer went through mtp_splitk.ops
    assert seen - weights <= embeddings  # and nothing else but a tied LM head did
    if family == "llama":  # tied embeddings: QuantizedEmbedding.as_linear is the head
        assert embeddings <= seen
    if any(isinstance(m, switch_layers.QuantizedSwitchLinear) for m in layers):
        sorted_flags = {s for op, _, s in spy if op == "gather_qmm"}
        assert sorted_flags == {True, False}  # prefill sorts the experts, decode does not

    # The routes are known now: the same forward sends MLX's calls straight to
    # the original methods, past the ops; under ops.recording() every call
    # goes through the ops again. Same logits both ways.
    first = len(spy)
    with mtp_splitk.enabled():
        routed = forward(model)
    assert len(spy) == first
    with mtp_splitk.enabled(), ops.recording() as calls:
        recorded = forward(model)
    assert len(calls) == len(spy) - first >= first
    assert all(call.plan is None for call in calls)  # the CPU: MLX's op took them all
    for a, b, c in zip(expected, routed, recorded):
        assert mx.array_equal(a, b) and mx.array_equal(a, c)


@pytest.mark.parametrize(
    "layer_class", [nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear]
)
def test_tensor_parallel_layers(layer_class, spy):
    """The sharded layers of mlx-lm's tensor-parallel models, on a one-process
    group (all_sum is the identity): same output, matmul through ops, bias kept."""
    group = mx.distributed.init()
    layer = layer_class(128, 64, bias=True, group=group)
    layer.bias = mx.arange(64, dtype=mx.float32)
    x = mx.random.normal((3, 128), key=mx.random.key(0))
    expected = layer(x)
    with mtp_splitk.enabled():
        patched = layer(x)
    assert mx.array_equal(expected, patched)
    assert [w for _, w, _ in spy] == [id(layer["weight"])]
    unbiased = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, True, 64, 4)
    assert mx.allclose(patched - unbiased, layer.bias, atol=1e-5)


def test_enable_disable_round_trip_leaves_output_unchanged(model_dirs):
    model, _ = load(model_dirs["qwen3_moe"])
    before = forward(model)
    patch.enable()
    during = forward(model)
    patch.disable()
    after = forward(model)
    assert all(mx.array_equal(a, b) for a, b in zip(before, during))
    assert all(mx.array_equal(a, b) for a, b in zip(before, after))
    assert (
        switch_layers.QuantizedSwitchLinear.__call__.__module__
        == "mlx_lm.models.switch_layers"
    )


@pytest.mark.parametrize("family", SPECULATIVE)
def test_speculative_decoding_under_the_patch_matches_greedy(model_dirs, family):
    path = model_dirs["deepseek_v3_f32" if family == "deepseek_v3" else family]
    model, _ = load(path)
    draft, _ = load(model_dirs["draft"])
    assert can_trim_prompt_cache(make_prompt_cache(model))
    plain = [t for t, _ in generate_step(PROMPT, model, max_tokens=24)]

    with mtp_splitk.enabled():
        # The model drafting for itself accepts (almost) everything; an
        # unrelated draft gets rejected: both paths of the loop run.
        for drafter, k in ((model, 3), (draft, 2)):
            out = list(
                speculative_generate_step(
                    PROMPT, model, drafter, num_draft_tokens=k, max_tokens=24
                )
            )
            assert [t for t, _, _ in out] == plain
            accepted = sum(from_draft for _, _, from_draft in out)
            if drafter is model:
                assert accepted >= 12


def test_stream_generate_with_draft_model(model_dirs):
    model, tokenizer = load(model_dirs["qwen3_moe"])
    draft, _ = load(model_dirs["draft"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    plain = "".join(
        r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=20)
    )
    with mtp_splitk.enabled():
        responses = list(
            stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=20,
                draft_model=model,
                num_draft_tokens=3,
            )
        )
    assert "".join(r.text for r in responses) == plain
    assert any(r.from_draft for r in responses)


# -- GPU (run on the device machine by the lead) -------------------------------------------


def _relative_error(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_gpu_patched_logits_within_bf16_tolerance(tmp_path, family, monkeypatch):
    """ "small" widths (every K >= 128) so the planner sends the matmuls to the
    split-K kernels; a forced split makes it do so without a tuning table."""
    from mtp_splitk import launch, plan

    model, _ = mlx_lm.load(str(synthetic.write_model(tmp_path / "m", family, "small")))
    expected = forward(model)
    launches = []
    dense = launch.dense
    monkeypatch.setattr(
        launch, "dense", lambda *a, **k: launches.append(1) or dense(*a, **k)
    )
    previous = plan.forced_split()
    plan.set_split(2)
    try:
        with mtp_splitk.enabled():
            patched = forward(model)
    finally:
        plan.set_split(previous)
    assert launches, "no matmul reached the split-K kernels"
    for a, b in zip(patched, expected):
        assert mx.isfinite(a).all().item()
        assert _relative_error(a, b) < 2e-2
        agree = (a.argmax(-1) == b.argmax(-1)).astype(mx.float32).mean().item()
        assert agree >= 0.9


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_gpu_patched_layer_is_batch_invariant(mode):
    """A row's output does not depend on how many rows share the call, so a
    verify pass reproduces decode bit for bit at the matmul level."""
    from mtp_splitk import plan

    layer = nn.QuantizedLinear(4096, 4096, bias=False, mode=mode)
    layer.update(
        tree_map(
            lambda p: p.astype(mx.bfloat16) if p.dtype == mx.float32 else p,
            layer.parameters(),
        )
    )
    x = mx.random.normal((5, 4096)).astype(mx.bfloat16)
    previous = plan.forced_split()
    plan.set_split(4)  # the kernel for every M here, whatever the tuning table says
    try:
        with mtp_splitk.enabled():
            together = layer(x)
            alone = mx.concatenate([layer(x[i : i + 1]) for i in range(5)])
    finally:
        plan.set_split(previous)
    assert mx.array_equal(together, alone)
