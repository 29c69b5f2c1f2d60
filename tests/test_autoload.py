# Copyright © 2026 mtp_splitk contributors

"""``MTP_SPLITK=1``: every way of starting the stock mlx-lm runs it patched,
says so in one stderr line, and nothing heavy is imported at start-up.

Each run is a fresh interpreter that imports nothing of mlx_lm before the
program does. A ``sitecustomize`` on PYTHONPATH processes a directory
holding the .pth file the build installs (as site-packages is processed at
start-up) and, at exit, reports on stderr whether the patch was enabled and,
when asked, how many calls reached mtp_splitk.ops (the probe then records
them from start-up on).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtp_splitk import synthetic
from mtp_splitk._autoload_build import PTH_LINE, PTH_NAME

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LINE = re.compile(
    r"^mtp_splitk: MTP_SPLITK=1, .*device .+, (tuning table \S+\.json|no table: kernels off"
    r"|kernels off \(MTP_SPLITK_SPLIT=off\)|split-K forced to \d warps for M <= 64 \(MTP_SPLITK_SPLIT\))$"
)

PROBE = """
import atexit, os, site, sys

site.addsitedir({site_dir!r})
light = "mlx" not in sys.modules and "mtp_splitk" not in sys.modules
calls = None
if os.environ.get("PROBE_RECORD") == "1":
    from mtp_splitk import ops  # mlx.core, not mlx_lm

    block = ops.recording()
    calls = block.__enter__()


def report():
    patch = sys.modules.get("mtp_splitk.patch")
    enabled = patch is not None and patch.is_enabled()
    print("PROBE", light, enabled, -1 if calls is None else len(calls), file=sys.stderr)


atexit.register(report)
"""


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    """A directory holding the .pth file the package build installs."""
    d = tmp_path_factory.mktemp("site")
    (d / PTH_NAME).write_text(PTH_LINE)
    return d


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory, site_dir):
    d = tmp_path_factory.mktemp("probe")
    (d / "sitecustomize.py").write_text(PROBE.format(site_dir=str(site_dir)))
    return d


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return synthetic.write_model(tmp_path_factory.mktemp("models") / "llama", "llama", "tiny")


def _env(env_value, pythonpath, record=False):
    env = {k: v for k, v in os.environ.items() if k not in ("MTP_SPLITK", "PROBE_RECORD")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    if env_value is not None:
        env["MTP_SPLITK"] = env_value
    if record:
        env["PROBE_RECORD"] = "1"
    return env


def _run(argv, probe_dir, env_value="1", record=False, cwd=None):
    """(returncode, stdout, mtp_splitk stderr lines, (light, enabled, calls))."""
    result = subprocess.run(
        argv,
        env=_env(env_value, [probe_dir, REPO], record),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    lines = result.stderr.splitlines()
    probe = [line.split()[1:] for line in lines if line.startswith("PROBE ")]
    assert len(probe) == 1, result.stderr[-3000:]
    light, enabled, calls = probe[0]
    ours = [line for line in lines if line.startswith("mtp_splitk:")]
    return result.returncode, result.stdout, ours, (light == "True", enabled == "True", int(calls))


def _python(script, site_dir, env_value, *args):
    """Run a script after processing ``site_dir`` the way site-packages is
    processed at start-up (its .pth files run), with the checkout importable."""
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *args],
        env=_env(env_value, [REPO]),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_switch_is_quiet_where_the_package_is_gone(site_dir, tmp_path):
    """An editable install whose checkout moved leaves the .pth behind: start-up
    with MTP_SPLITK=1 then prints nothing and runs the program."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MTP_SPLITK"] = "1"
    prelude = "import site, sys; sys.path[:] = [p for p in sys.path if 'mtp_splitk' not in p]; "
    result = subprocess.run(
        [sys.executable, "-S", "-c", prelude + f"site.addsitedir({str(site_dir)!r}); print('ran')"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "ran\n" and result.stderr == "", result.stderr


@pytest.mark.parametrize("value,patched", [("1", True), ("0", False), (None, False)])
def test_environment_variable(site_dir, value, patched):
    result = _python(
        """
        light = "mlx" not in sys.modules and "mtp_splitk" not in sys.modules
        import mlx_lm
        import mlx.nn as nn
        from mlx_lm.models import switch_layers
        print(light, nn.QuantizedLinear.__call__.__module__,
              switch_layers.QuantizedSwitchLinear.__call__.__module__)
        """,
        site_dir,
        value,
    )
    assert result.returncode == 0, result.stderr
    module = "mtp_splitk.patch" if patched else None
    light, linear, switch = result.stdout.split()
    assert light == "True"  # the .pth imports nothing heavy at start-up, set or not
    assert (linear == "mtp_splitk.patch") == patched
    assert (switch == "mtp_splitk.patch") == patched, module
    said = [line for line in result.stderr.splitlines() if line.startswith("mtp_splitk:")]
    assert len(said) == int(patched) and all(LINE.match(line) for line in said)


def test_stock_mlx_lm_generate_runs_patched(site_dir, llama):
    """`python -m mlx_lm generate` with MTP_SPLITK=1 sends its matmuls through mtp_splitk.ops."""
    result = _python(
        """
        import mlx_lm, runpy
        from mtp_splitk import ops
        sys.argv = ["mlx_lm", "generate", "--model", sys.argv[1], "--max-tokens", "5"]
        with ops.recording() as calls:
            runpy.run_module("mlx_lm", run_name="__main__", alter_sys=True)
        print("calls", len(calls))
        """,
        site_dir,
        "1",
        str(llama),
    )
    assert result.returncode == 0, result.stderr
    assert "Generation: 5 tokens" in result.stdout
    calls = int(result.stdout.split("calls")[-1])
    assert calls >= 5 * 15  # 14 layers + the tied head per token, at least


def test_stock_mlx_lm_loads_a_checkpoint_with_mtp_tensors_under_the_switch(site_dir, tmp_path):
    """MTP_SPLITK=1: mlx_lm.load of a checkpoint whose shards hold its MTP
    head (as Hugging Face keeps them) gives the target alone; without the
    switch mlx-lm's strict load refuses the extra keys, as before."""
    from mtp_splitk import synthetic

    path = synthetic.write_mtp_model(tmp_path / "deepseek", "deepseek_v3")
    script = """
        import mlx_lm
        model, _ = mlx_lm.load(sys.argv[1])
        print("loaded", type(model).__module__)
        """
    on = _python(script, site_dir, "1", str(path))
    assert on.returncode == 0, on.stderr[-2000:]
    assert "loaded mlx_lm.models.deepseek_v3" in on.stdout
    off = _python(script, site_dir, None, str(path))
    assert off.returncode != 0 and "parameters not in model" in off.stderr


SCRIPT = "import mlx_lm, sys\nprint('script ran', mlx_lm.__name__)\n"
ENTRY_POINTS = {
    "python -m mlx_lm generate": [sys.executable, "-m", "mlx_lm", "generate", "--help"],
    "python -m mlx_lm server": [sys.executable, "-m", "mlx_lm", "server", "--help"],
    "python -m mlx_lm chat": [sys.executable, "-m", "mlx_lm", "chat", "--help"],
    "python -m mlx_lm.generate": [sys.executable, "-m", "mlx_lm.generate", "--help"],
    "python -m mlx_lm.server": [sys.executable, "-m", "mlx_lm.server", "--help"],
    "mlx_lm.generate": [str(BIN / "mlx_lm.generate"), "--help"],
    "mlx_lm generate": [str(BIN / "mlx_lm"), "generate", "--help"],
    "a script": [sys.executable, "script.py"],
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_runs_patched(probe_dir, tmp_path, name):
    argv = ENTRY_POINTS[name]
    if not Path(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed (mlx-lm's console scripts)")
    (tmp_path / "script.py").write_text(SCRIPT)
    rc, stdout, said, (light, enabled, _) = _run(argv, probe_dir, cwd=tmp_path)
    assert rc == 0 and ("usage" in stdout or "script ran" in stdout)
    assert light  # nothing heavy at start-up
    assert enabled
    assert len(said) == 1 and LINE.match(said[0]), said


@pytest.mark.parametrize("value", ["0", None])
def test_without_the_switch_nothing_is_patched_or_said(probe_dir, value):
    argv = ENTRY_POINTS["python -m mlx_lm generate"]
    rc, _, said, (light, enabled, _) = _run(argv, probe_dir, value)
    assert rc == 0 and light and not enabled and not said


def test_python_m_mlx_lm_generate_sends_its_matmuls_through_ops(probe_dir, llama):
    argv = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(llama), "--max-tokens", "5"]
    rc, stdout, said, (_, enabled, calls) = _run(argv, probe_dir, record=True)
    assert rc == 0 and "Generation: 5 tokens" in stdout
    assert enabled and len(said) == 1
    assert calls >= 5 * 15  # 14 layers + the tied head per token, at least


@pytest.mark.parametrize(
    "code",
    [
        "import mtp_splitk; mtp_splitk.enable()",  # before any mlx_lm import
        "from mtp_splitk import patch",  # importing the patch imports mlx_lm
        "import mtp_splitk, mlx_lm; mtp_splitk.enable()",
    ],
)
def test_enable_or_patch_import_before_mlx_lm_with_the_switch_on(probe_dir, code):
    script = code + (
        "\nimport mlx.nn as nn, mtp_splitk\n"
        "print(nn.QuantizedLinear.__call__.__module__, mtp_splitk.is_enabled())\n"
    )
    rc, stdout, said, (_, enabled, _) = _run([sys.executable, "-c", script], probe_dir)
    assert rc == 0, said
    assert stdout.split() == ["mtp_splitk.patch", "True"] and enabled
    assert len(said) == 1 and LINE.match(said[0])


@pytest.mark.parametrize("split,forced,said", [
    ("4", "4", "split-K forced to 4 warps for M <= 64 (MTP_SPLITK_SPLIT)"),
    ("off", "0", "kernels off (MTP_SPLITK_SPLIT=off)"),
    ("7", "None", "MTP_SPLITK_SPLIT ignored: expected auto, off or one of 1, 2, 4, 8; got '7'"),
])
def test_split_variable_sets_the_policy_of_the_stock_tools(site_dir, tmp_path, split, forced, said):
    """MTP_SPLITK_SPLIT is generate's --split-k for the stock tools (e.g. kernels on a GPU
    without a table); a bad value is one stderr line and the planner's own policy."""
    env = _env("1", [REPO])
    env.update(MTP_SPLITK_SPLIT=split, MTP_SPLITK_CACHE=str(tmp_path / "cache"))
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r})\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + "import mlx_lm\nfrom mtp_splitk import plan\nprint(plan.forced_split())"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and result.stdout.split() == [forced], result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mtp_splitk:")]
    assert any(said in line for line in lines), lines
    assert sum(bool(LINE.match(line)) for line in lines) == 1


def test_the_line_names_the_users_own_table_first(site_dir, tmp_path):
    """A table `mtp-splitk tune` wrote is the one the planner reads: the line names it."""
    from mtp_splitk import plan

    cache_dir = tmp_path / "cache"
    env = _env("1", [REPO])
    env.update(MTP_SPLITK_CACHE=str(cache_dir))
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r})\n"
    table = cache_dir / "tuning" / (plan.tuning_key(plan.current_device().name) + ".json")
    table.parent.mkdir(parents=True)
    table.write_text("{}")
    result = subprocess.run([sys.executable, "-c", prelude + "import mlx_lm"], env=env,
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("mtp_splitk:")]
    assert len(lines) == 1 and lines[0].endswith(f"tuning table {table}"), lines
