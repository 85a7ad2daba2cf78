"""The compiles root's own filesystem: the plan (size from free space, the variable, a dir
already mounted, an image to reuse) and doctor's line. The real mount: tests/integration/
test_compiles_fs.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from init import config
from init.checks import Status
from init.engine import compiles_fs
from init.engine.compiles_fs import Action
from init.errors import EX_CONFIG, ConfigError

GIB = 1 << 30
MIB = 1 << 20


def free_of(size: int) -> Callable[[Path], int]:
    return lambda _path: size


def compiles(tmp_path: Path) -> Path:
    return tmp_path / "data" / "compiles"  # tmp_path stands for the data volume


@pytest.mark.parametrize(
    ("free", "size"),
    [(100 * GIB, 10 * GIB), (8 * GIB, 4 * GIB), (3 * GIB + 5, 1536 * MIB), (512 * MIB, 256 * MIB)],
)
def test_auto_size_is_ten_gib_or_half_the_free_space(tmp_path: Path, free: int, size: int) -> None:
    plan = compiles_fs.plan(compiles(tmp_path), None, (33, 33), mounts=(), free=free_of(free))
    assert plan.action is Action.MAKE
    assert plan.size == size
    assert plan.inodes == size // (16 << 10)
    assert plan.image == tmp_path / "data" / "compiles.img"
    assert plan.owner == (33, 33)
    assert not plan.explicit


def test_auto_makes_none_on_a_nearly_full_disk_and_says_why(tmp_path: Path) -> None:
    plan = compiles_fs.plan(compiles(tmp_path), None, mounts=(), free=free_of(300 * MIB))
    assert plan.action is Action.SKIP and not plan.works
    assert "only 300 MiB free" in plan.notes[0]
    assert config.COMPILES_SIZE in plan.notes[0]


def test_an_explicit_size_is_used_whatever_the_free_space(tmp_path: Path) -> None:
    plan = compiles_fs.plan(compiles(tmp_path), 20 * GIB, mounts=(), free=free_of(GIB))
    assert (plan.action, plan.size, plan.explicit) == (Action.MAKE, 20 * GIB, True)


def test_zero_is_off(tmp_path: Path) -> None:
    plan = compiles_fs.plan(compiles(tmp_path), 0, mounts=(), free=free_of(100 * GIB))
    assert plan.action is Action.OFF and not plan.works
    assert f"{config.COMPILES_SIZE}=0" in plan.notes[0]


def test_a_compiles_dir_already_mounted_is_left_alone(tmp_path: Path) -> None:
    target = compiles(tmp_path)
    plan = compiles_fs.plan(target, 20 * GIB, mounts=("/", str(target)), free=free_of(100 * GIB))
    assert plan.action is Action.MOUNTED and not plan.works
    assert "left as it is" in plan.notes[0]


def test_an_image_of_an_earlier_boot_is_reused_at_its_own_size(tmp_path: Path) -> None:
    target = compiles(tmp_path)
    target.parent.mkdir()
    with open(target.parent / "compiles.img", "wb") as image:
        image.truncate(3 * GIB)
    auto = compiles_fs.plan(target, None, mounts=(), free=free_of(100 * GIB))
    assert (auto.action, auto.size, auto.notes) == (Action.REUSE, 3 * GIB, ())
    asked = compiles_fs.plan(target, 20 * GIB, mounts=(), free=free_of(100 * GIB))
    assert (asked.action, asked.size) == (Action.REUSE, 3 * GIB)
    assert "keeps its size" in asked.notes[0] and "remove" in asked.notes[0]


def test_no_data_volume_makes_nothing(tmp_path: Path) -> None:
    plan = compiles_fs.plan(tmp_path / "no" / "data" / "compiles", None, mounts=())
    assert plan.action is Action.SKIP
    assert "does not exist" in plan.notes[0]


def test_the_child_is_given_the_plan(tmp_path: Path) -> None:
    plan = compiles_fs.plan(compiles(tmp_path), 1 * GIB, (33, 34), mounts=(), free=free_of(GIB))
    argv = plan.argv(tmp_path / "r.json")
    assert argv[argv.index("--size") + 1] == str(GIB)
    assert argv[argv.index("--owner") + 1] == "33:34"
    assert "--make" in argv


@pytest.mark.parametrize(
    ("value", "size"),
    [("", None), ("auto", None), (" AUTO ", None), ("0", 0), ("off", 0), ("20g", 20 * GIB),
     ("512m", 512 * MIB), ("1.5GiB", 3 * GIB // 2), (str(GIB), GIB)],
)  # fmt: skip
def test_the_variable(value: str, size: int | None) -> None:
    settings = config.load({config.COMPILES_SIZE: value}, root=Path("/nonexistent"))
    assert settings.compiles_size == size


@pytest.mark.parametrize("value", ["ten", "100m", "-1g", "20x", "1g 2g"])
def test_a_bad_value_is_one_line_and_exit_78(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({config.COMPILES_SIZE: value}, root=Path("/nonexistent"))
    assert raised.value.exit_status == EX_CONFIG
    (line,) = raised.value.problems
    assert line.startswith(f"{config.COMPILES_SIZE}={value!r}")
    assert "20g" in line and "0 (off)" in line


def test_doctor_warns_when_the_compiles_root_shares_the_data_dirs_filesystem(
    tmp_path: Path,
) -> None:
    target = compiles(tmp_path)
    target.mkdir(parents=True)
    found = compiles_fs.check(target)
    assert found.status is Status.WARN
    assert f"shares a filesystem with {target.parent}" in found.message
    assert "sized volume or filesystem" in found.fix


def test_doctor_is_quiet_before_the_compiles_root_exists(tmp_path: Path) -> None:
    assert compiles_fs.check(compiles(tmp_path)).status is Status.OK


def test_without_mkfs_the_child_says_so_and_leaves_no_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    plan = compiles_fs.plan(compiles(tmp_path), 300 * MIB, mounts=(), free=free_of(GIB))
    result = compiles_fs.apply(plan.compiles_dir, plan.image, plan.size, plan.inodes, None, True)
    assert not result.ok
    assert result.error == "no mkfs.ext4 in this image"
    assert "e2fsprogs" in result.fix and f"{config.COMPILES_SIZE}=0" in result.fix
    assert list((tmp_path / "data").iterdir()) == []  # made (a first boot's), but empty


def test_off_names_an_image_left_from_an_earlier_boot(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "compiles.img").write_bytes(b"")
    plan = compiles_fs.plan(compiles(tmp_path), 0, mounts=())
    assert "compiles.img of an earlier boot is not used: remove it" in plan.notes[0]
