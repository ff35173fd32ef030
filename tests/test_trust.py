"""Trust what it writes (issue 22; the promises are docs/PROMISES.md): one row per way a user's
files, caches or numbers could be lost or silently wrong, grouped by family.

Families (the `family` of each row):
  data-loss     nothing the user did not ask to replace is deleted or overwritten
  integrity     caches keyed by content and sealed; artifacts checked by hash before use
  wrong-result  inputs that would give a wrong number are refused, or named
  grammar       one precision grammar: what the docs promise is accepted, nothing else
  one-line      errors a user can fix are one line (what, where, what to do), exit 2

Every row runs the CLI in-process with the test's tmp folder as the working directory
(so a default --workdir lands there). For a refusal (exit 2) the runner also checks the
rule behind every row: the tree under tmp is exactly as before the command (no file
changed, removed or added, the workdir lock included), unless the row names what may
appear (`may_create`). `item` is the numbered item of issue 22 the row reproduces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from cunet_optimize.cli import main

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny face model, 6 synthetic faces (4 train, 2 test), and one finished fp32 build of
    them (rows that need a build copy `env.workdir`)."""
    import torch

    from cunet_optimize.data.synth import write_synthetic_faces
    from cunet_optimize.models import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("trust")
    faces = root / "faces"
    write_synthetic_faces(faces, 6, seed=5, test_fraction=2 / 6, progress=False)
    torch.manual_seed(0)
    model = root / "tiny.safetensors"
    save_checkpoint(create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2), model)
    workdir = root / "built"
    assert main(["build", "--precision", "fp32", "--model", str(model), "--eval-data", str(faces),
                 "--eval-split", "all", "--no-accuracy-gate", "--workdir", str(workdir)]) == 0
    return SimpleNamespace(root=root, faces=faces, model=str(model), workdir=workdir,
                           build=workdir / "engines" / "tiny-fp32-cpu",
                           images=sorted((faces / "images").glob("*.png")))


def built_workdir(env, tmp: Path, name: str = "w") -> Path:
    """A copy of the module's finished build in tmp/<name>."""
    return Path(shutil.copytree(env.workdir, tmp / name, symlinks=True))


def build_args(env, workdir, *extra) -> list[str]:
    """A quick build of the tiny model (fp32 unless `extra` says otherwise)."""
    return ["build", "--precision", "fp32", "--model", env.model, "--eval-data", str(env.faces),
            "--eval-split", "all", "--calib-data", str(env.faces), "--calib-split", "all",
            "--no-accuracy-gate", "--workdir", str(workdir), *extra]


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _assert(condition: bool, context: str) -> None:
    assert condition, context[-3000:]


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    family: str  # data-loss | integrity | wrong-result | grammar | one-line
    item: int  # issue 22's numbered item (0: the review note)
    argv: Callable  # (env, tmp) -> argv; may prepare files under tmp first
    status: int
    message: str | None = None  # exit 2: in the error line; exit 0: anywhere in stderr
    may_create: tuple[str, ...] = ()  # exit 2: globs (relative to tmp) of files allowed to appear
    check: Callable | None = None  # (env, tmp, stdout, stderr) -> None, after the generic checks
    marks: tuple = ()


FAMILIES = ("data-loss", "integrity", "wrong-result", "grammar", "one-line")

CASES: list[Case] = [
    # ------------------------------------------------------------------- data loss (1, 2, 3, 11)
    Case("build-name-dotdot", "data-loss", 1,
         lambda e, t: build_args(e, t / "w", "--name", "..") if touch(t / "w" / "mine.txt", "user file") else [],
         2, "--name '..' is not a build folder name"),
    Case("build-name-dotdot-force", "data-loss", 1,
         lambda e, t: build_args(e, built_workdir(e, t), "--name", "..", "--force"), 2,
         "--name '..' is not a build folder name"),
    Case("build-name-with-slash", "data-loss", 1, lambda e, t: build_args(e, t / "w", "--name", "a/b"), 2,
         "--name 'a/b' is not a build folder name"),
    Case("build-name-hidden", "data-loss", 1, lambda e, t: build_args(e, t / "w", "--name", ".x"), 2,
         "--name '.x' is not a build folder name"),
    Case("build-name-dash", "data-loss", 1, lambda e, t: build_args(e, t / "w", "--name=-x"), 2,
         "--name '-x' is not a build folder name"),
    Case("build-model-named-like-a-dotfile", "data-loss", 1,
         lambda e, t: build_args(e, t / "w") + ["--model", str(shutil.copy(e.model, t / ".face.safetensors"))], 0,
         check=lambda e, t, out, err: _assert([p.name for p in (t / "w" / "engines").iterdir()]
                                              == ["face-fp32-cpu"], err)),
    Case("build-force-over-a-file", "data-loss", 3,
         lambda e, t: build_args(e, t / "w", "--force") if touch(t / "w" / "engines" / "tiny-fp32-cpu", "x") else [],
         2, "engines/tiny-fp32-cpu exists and is not a build folder"),
    Case("build-force-over-a-folder-that-is-not-a-build", "data-loss", 3,
         lambda e, t: build_args(e, t / "w", "--force")
         if touch(t / "w" / "engines" / "tiny-fp32-cpu" / "notes.txt", "mine") else [],
         2, "engines/tiny-fp32-cpu exists and is not a build (no build.json)"),
    Case("build-force-replaces-a-build", "data-loss", 3,
         lambda e, t: build_args(e, built_workdir(e, t), "--force"), 0,
         check=lambda e, t, out, err: _assert(sorted(p.name for p in (t / "w" / "engines").iterdir())
                                              == ["tiny-fp32-cpu"], err)),
    Case("build-refused-leaves-no-workdir", "data-loss", 11,
         lambda e, t: build_args(e, t / "new", "--target", "no-such-target"), 2, "no-such-target"),
    Case("build-refused-existing-build-leaves-no-lock", "data-loss", 11,
         lambda e, t: build_args(e, built_workdir(e, t)), 2, "already exists; pass --force"),
    # ------------------------------------------------------------------- end data loss

    # ------------------------------------------------------------------- integrity (4, 5, 6)
    # ------------------------------------------------------------------- end integrity

    # ------------------------------------------------------------------- wrong results (7, 8, 9)
    # ------------------------------------------------------------------- end wrong results

    # ------------------------------------------------------------------- grammar (10)
    # ------------------------------------------------------------------- end grammar

    # ------------------------------------------------------------------- one line (12, 13)
    # ------------------------------------------------------------------- end one line
]


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (links as their target path)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            found[rel] = (f"link:{os.readlink(path)}" if path.is_symlink()
                          else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def error_line(err: str, command: str) -> str:
    """The one line a refusal prints: `cunet-optimize <command>: error: ...`."""
    lines = [line for line in err.splitlines() if line.startswith(f"cunet-optimize {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.family}-{c.id}", marks=c.marks) for c in CASES])
def test_trust(case, env, tmp_path, capsys, caplog, monkeypatch):
    assert case.family in FAMILIES
    monkeypatch.chdir(tmp_path)
    argv = [str(a) for a in case.argv(env, tmp_path)]
    before = tree(tmp_path)
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse refusals
        status = exc.code
    out, err = capsys.readouterr()
    err += caplog.text  # warnings go through logging (to stderr outside pytest)
    assert status == case.status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if case.status == 2:
        line = error_line(err, argv[0])
        if case.message is not None:
            assert case.message in line, err[-3000:]
        after = tree(tmp_path)
        changed = sorted(p for p in before if after.get(p) != before[p])
        added = sorted(p for p in after if p not in before
                       and not any(fnmatch.fnmatch(p, g) for g in case.may_create))
        assert not changed and not added, f"changed {changed}, added {added}"
    elif case.message is not None:
        assert case.message in err, err[-3000:]
    if case.check:
        case.check(env, tmp_path, out, err)


def test_every_family_has_rows():
    assert {c.family for c in CASES} == set(FAMILIES)
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- data loss: the auto build (review note)


@pytest.mark.slow
def test_failed_auto_build_leaves_the_build_it_would_replace(env, tmp_path, capsys, monkeypatch):
    """`build --precision auto --force` whose every plan fails the gate: the existing build is
    untouched, and no staging folder is left (each plan is assembled in staging, renamed once)."""
    from cunet_optimize import build as build_module
    from cunet_optimize.quant import auto_build

    workdir = built_workdir(env, tmp_path)
    existing = workdir / "engines" / "tiny-auto-cpu"
    shutil.copytree(env.build, existing)
    before = tree(existing)
    monkeypatch.setattr(auto_build, "MAX_BUILDS", 2)
    real_gate = build_module._accuracy_gate
    monkeypatch.setattr(build_module, "_accuracy_gate", lambda *a, **k: {**real_gate(*a, **k), "passed": False})
    argv = ["build", "--model", env.model, "--precision", "auto", "--calib-data", str(env.faces), "--calib-split",
            "all", "--eval-data", str(env.faces), "--eval-split", "all", "--workdir", str(workdir), "--force"]
    assert main(argv) == 2
    assert "no plan met the gate after 2 build(s)" in error_line(capsys.readouterr().err, "build")
    assert tree(existing) == before
    assert sorted(p.name for p in (workdir / "engines").iterdir()) == ["tiny-auto-cpu", "tiny-fp32-cpu"]


@pytest.mark.slow
def test_build_killed_while_replacing_keeps_the_old_build(env, tmp_path):
    """kill -9 between renaming the old build aside and the new one in: the next build into
    the workdir puts the old one back (and then refuses to overwrite it without --force)."""
    import subprocess
    import sys
    import textwrap

    workdir = built_workdir(env, tmp_path)
    before = tree(workdir / "engines" / "tiny-fp32-cpu")
    killer = textwrap.dedent(f"""
        import os, signal
        from cunet_optimize import build
        real = os.replace
        def replace(a, b):
            real(a, b)
            if ".partial-replaced-" in str(b):
                os.kill(os.getpid(), signal.SIGKILL)  # the old build is aside, the new one not in
        build.os.replace = replace
        from cunet_optimize.cli import main
        main({build_args(env, workdir, "--force")!r})
    """)
    env_vars = {**os.environ, "PYTHONPATH": str(REPO / "toolkit") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, env=env_vars)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (workdir / "engines" / "tiny-fp32-cpu").exists()
    assert main(build_args(env, workdir)) == 2  # restored under the lock, then refused: it exists
    assert tree(workdir / "engines" / "tiny-fp32-cpu") == before
    assert [p.name for p in (workdir / "engines").iterdir()] == ["tiny-fp32-cpu"]
