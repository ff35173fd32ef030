"""Build folders as the profiler sees them: find them, read and check their build.json.

`cunet-optimize build` writes one folder per build under <workdir>/engines/ with a
`build.json` manifest (manifests/build.py: BuildManifest, schema "cunet-optimize/build/1",
see engines/README.md). Everything this module rejects is a CUNetError naming the file
and what to do. `BuildFolder.check_artifacts` compares every file with the sha256
build.json recorded, before anything in the folder is run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cunet_optimize.errors import CUNetError
from cunet_optimize.manifests.build import BUILD_FILE, BuildManifest, artifact_hash_problems, read_build_manifest
from cunet_optimize.manifests.schema import ManifestError

log = logging.getLogger(__name__)


class BuildFolderError(CUNetError):
    """A build folder or manifest the profiler cannot use."""


@dataclass
class BuildFolder:
    """One build folder and its manifest."""

    path: Path  # the build folder (absolute)
    manifest: BuildManifest = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def backend(self) -> str:
        return self.manifest.backend

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def engine_built(self) -> bool:
        return self.manifest.engine_built

    @property
    def model_sha256(self) -> str:
        return self.manifest.model.sha256

    @property
    def checkpoint(self) -> Path:
        return Path(self.manifest.model.checkpoint)

    def artifact(self, role: str) -> Path | None:
        """Absolute path of an artifact (paths in build.json are relative to the folder)."""
        rel = self.manifest.artifacts.get(role)
        if not rel:
            return None
        p = Path(rel)
        return p if p.is_absolute() else self.path / p

    def check_artifacts(self) -> list[str]:
        """BuildFolderError when a file of the folder is not the one the build wrote (replaced, edited,
        missing), or session.json names another source ONNX than the build's; the notes to carry
        (a build.json from before artifact hashes: nothing to check against)."""
        if self.manifest.artifact_sha256 is None:
            log.warning("%s records no artifact hashes (built before they were recorded): its files are not "
                        "checked; rebuild it to have them checked", self.path / BUILD_FILE)
            return [f"{BUILD_FILE} records no artifact hashes: the files were not checked before measuring"]
        problems = artifact_hash_problems(self.manifest, self.path)
        session, onnx_path = self.artifact("session"), self.artifact("onnx")
        if not problems and session is not None and onnx_path is not None and session.is_file() \
                and onnx_path.is_file():
            from cunet_optimize.engines.onnxrt import session_source_problem

            why = session_source_problem(session, onnx_path)
            if why:
                problems.append((os.path.relpath(session, self.path), why))
        if problems:
            rel, why = problems[0]
            raise BuildFolderError(f"{_shown(self.path / rel)} {why}; rebuild with `{self.rebuild_command}`")
        return []

    @property
    def rebuild_command(self) -> str:
        """The command that made this build, with --force (generic when build.json has none)."""
        command = (self.manifest.command or "").strip()
        if not command.startswith("cunet-optimize build"):
            return "cunet-optimize build ... --force"
        return command if " --force" in f" {command} " else f"{command} --force"


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is inside it (as the user typed it)."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_build(folder: str | os.PathLike) -> BuildFolder:
    """The build in `folder`; BuildFolderError if the folder or its build.json is unusable."""
    path = Path(folder).resolve()
    if not path.exists():
        raise BuildFolderError(f"engine folder not found: {folder}; pass a folder written by `cunet-optimize build`")
    if not path.is_dir():
        raise BuildFolderError(f"{folder} is not a folder; pass a build folder (engines/<name>/), not a file")
    manifest_path = path / BUILD_FILE
    if not manifest_path.is_file():
        raise BuildFolderError(
            f"{path}: no {BUILD_FILE}, so it is not a finished build; rebuild it with `cunet-optimize build`"
        )
    try:
        return BuildFolder(path, read_build_manifest(manifest_path))
    except ManifestError as exc:
        raise BuildFolderError(str(exc)) from None


def find_builds(workdir: str | os.PathLike = ".") -> list[BuildFolder]:
    """Every build under <workdir>/engines/ (folders holding a build.json), by name.

    Folders without a build.json (interrupted builds, other files) are skipped with
    a warning; a build.json that cannot be read is an error, not silently dropped.
    """
    root = Path(workdir) / "engines"
    if not root.is_dir():
        raise BuildFolderError(f"no engines folder at {root}; run `cunet-optimize build` first or pass ENGINE_DIR")
    builds = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / BUILD_FILE).is_file():
            log.warning("skipping %s: no %s (not a finished build)", folder, BUILD_FILE)
            continue
        builds.append(read_build(folder))
    if not builds:
        raise BuildFolderError(f"no builds found in {root} (no */{BUILD_FILE}); run `cunet-optimize build` first")
    return builds


def check_builds(builds: list[BuildFolder], allow_mixed: bool = False) -> None:
    """One model, distinct names: what makes a single report's rows comparable."""
    seen: dict[str, BuildFolder] = {}
    for b in builds:
        if b.name in seen:
            raise BuildFolderError(
                f"two builds are named '{b.name}' ({seen[b.name].path} and {b.path}); profile them separately"
            )
        seen[b.name] = b
    if allow_mixed:
        return
    first = builds[0]
    for b in builds[1:]:
        if b.model_sha256 != first.model_sha256:
            raise BuildFolderError(
                f"engines come from different models: {first.name} (model sha256 {first.model_sha256[:12]}) and "
                f"{b.name} (model sha256 {b.model_sha256[:12]}); profile them separately or pass --allow-mixed"
            )
