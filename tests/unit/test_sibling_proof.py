"""The sibling proof container against a fake engine: the compile profile (never root, no
capabilities, a read-only root, limits), only a fresh marker dir bound, and the proof's meaning
kept (the token written through the host path is read back here)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from init import config
from init.checks import Status
from init.config import DEFAULT_COMPILE_UIDS
from init.engine import sibling, sibling_check
from init.engine.client import RunResult
from init.engine.sibling_check import PROOF_MOUNT, PROOF_PREFIX, Report, SiblingRequest
from init.errors import EngineError
from tests.integration.conftest import require

HOST = PurePosixPath("/host/data/compiles")


class FakeEngine:
    """The host engine: `HOST` on the host is `here` in this container when `maps`."""

    def __init__(self, here: Path, maps: bool = True) -> None:
        self.here = here
        self.maps = maps
        self.runs: list[dict[str, Any]] = []

    def image_present(self, image: str) -> bool:
        return True

    def run_once(
        self,
        image: str,
        command: Sequence[str],
        binds: Iterable[tuple[str, str]],
        user: str,
        labels: Mapping[str, str],
        deadline: float,
        host_config: Mapping[str, Any] | None = None,
    ) -> RunResult:
        binds = list(binds)
        self.runs.append(
            {"command": list(command), "binds": binds, "user": user, "host_config": host_config}
        )
        ((source, target),) = binds
        relative = PurePosixPath(source).relative_to(HOST)
        local = self.here / relative
        if not self.maps or not local.is_dir():
            raise EngineError(
                f'invalid mount config for type "bind": bind source path does not exist: {source}'
            )
        # The script is `printf %s "$1" > "$2"`: the token into the file under the mount.
        token, path = command[-2], command[-1]
        (local / PurePosixPath(path).relative_to(target)).write_text(token)
        return RunResult(0, "")


def host_dir() -> sibling.HostDir:
    return sibling.HostDir("compiles", "SANDBOXED_COMPILES_HOST_DIR", HOST, None, HOST, False)


def prove(engine: FakeEngine, here: Path) -> sibling_check.Proof:
    request = SiblingRequest(result=here / "result.json", compiles_dir=here, image="texlive")
    return sibling_check.prove(
        engine,  # type: ignore[arg-type]
        request,
        host_dir(),
        Path("/run/docker.sock"),
        Report(),
    )


def test_the_proof_passes_through_a_fresh_marker_dir_and_leaves_nothing(tmp_path: Path) -> None:
    here = tmp_path / "compiles"
    here.mkdir()
    (here / "someone-elses-project").mkdir()
    engine = FakeEngine(here)
    proof = prove(engine, here)
    assert proof.status == "passed", proof.message
    ((source, target),) = engine.runs[0]["binds"]
    # Only the marker dir, never the compiles root with every project in it.
    assert source.startswith(f"{HOST}/{PROOF_PREFIX}") and source != str(HOST)
    assert target == PROOF_MOUNT
    assert sorted(p.name for p in here.iterdir()) == ["someone-elses-project"]


def test_the_proof_container_has_the_compile_profile(tmp_path: Path) -> None:
    here = tmp_path / "compiles"
    here.mkdir()
    engine = FakeEngine(here)
    assert prove(engine, here).status == "passed"
    run = engine.runs[0]
    uid, gid = (int(n) for n in run["user"].split(":"))
    assert uid != 0 and gid != 0
    assert uid in DEFAULT_COMPILE_UIDS  # a compile's uid, not the services'
    if os.geteuid() == 0:
        assert gid == sibling_check.NOBODY[1]  # the root-owned tmp dir: nobody's group
    profile = run["host_config"]
    assert profile["cap_drop"] == ["ALL"]
    assert "no-new-privileges" in profile["security_opt"]
    assert profile["read_only"] is True and profile["privileged"] is False
    assert (
        0 < profile["mem_limit"] <= 64 * 2**20 and profile["memswap_limit"] == profile["mem_limit"]
    )
    assert 0 < profile["pids_limit"] <= 16
    assert profile["ulimits"] == [{"name": "fsize", "soft": 1 << 20, "hard": 1 << 20}]


def test_the_owner_of_a_root_the_services_own_runs_the_proof(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "chown needs root")
    here = tmp_path / "compiles"
    here.mkdir()
    os.chown(here, 33, 33)
    seen: list[tuple[int, int, int]] = []

    class Watching(FakeEngine):
        def run_once(self, image: str, command: Sequence[str], *args: Any, **kw: Any) -> RunResult:
            ((source, _),) = kw["binds"]
            info = (here / PurePosixPath(source).name).stat()
            seen.append((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)))
            return super().run_once(image, command, *args, **kw)

    engine = Watching(here)
    assert prove(engine, here).status == "passed"
    # As a compile: a uid of the compile range, in the group of the dir (www-data's, 2770).
    proof_uid = DEFAULT_COMPILE_UIDS.uid_for(sibling_check.PROOF_PROJECT)
    assert engine.runs[0]["user"] == f"{proof_uid}:33" and seen == [(33, 33, 0o2770)]


def test_the_proof_uid_follows_the_compile_uid_range(tmp_path: Path) -> None:
    settings = config.load({"OVERLEAF_INIT_COMPILE_UID_BASE": "50000",
                            "OVERLEAF_INIT_COMPILE_UID_RANGE": "10"}, tmp_path)  # fmt: skip
    request = SiblingRequest.for_settings(settings, {}, tmp_path / "r.json")
    assert 50000 <= request.proof_uid < 50010
    assert SiblingRequest.from_argv(request.argv()).proof_uid == request.proof_uid


def test_a_host_dir_that_is_not_ours_fails_naming_both_paths(tmp_path: Path) -> None:
    here = tmp_path / "compiles"
    here.mkdir()
    proof = prove(FakeEngine(here, maps=False), here)
    assert proof.status == "failed"
    assert f"found no {HOST}/{PROOF_PREFIX}" in proof.message
    assert f"made here as {here}/{PROOF_PREFIX}" in proof.message
    assert f"{HOST} is not this container's {here}" in proof.message
    assert list(here.iterdir()) == []


def test_a_check_of_the_failed_proof_is_reported(tmp_path: Path) -> None:
    here = tmp_path / "compiles"
    here.mkdir()
    report = Report()
    request = SiblingRequest(result=here / "r.json", compiles_dir=here, image="texlive")
    sibling_check.prove(
        FakeEngine(here, maps=False),  # type: ignore[arg-type]
        request,
        host_dir(),
        Path("/run/docker.sock"),
        report,
    )
    (check,) = report.checks
    assert check.name == "proof" and check.status is Status.FAIL
