"""The suite's own plan (tests/conftest.py): which tests share a worker, which go first."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SECONDS, UNLISTED, _LongestFirst, unit

REPO = Path(__file__).resolve().parents[2]


def test_a_module_is_a_unit_and_the_end_to_end_tests_are_one() -> None:
    assert unit("tests/integration/test_sandbox.py::test_x[runsc]") == (
        "tests/integration/test_sandbox.py"
    )
    assert unit("tests/unit/test_config.py::test_y") == "tests/unit/test_config.py"
    assert (
        unit("tests/e2e/test_dind.py::test_z")
        == unit("tests/e2e/test_sibling.py::t")
        == ("tests/e2e")
    )


def test_every_timed_unit_is_there_to_run() -> None:
    # A module renamed or removed would otherwise leave its figure behind, and the new name
    # would start last as an unlisted one.
    assert [name for name in SECONDS if not (REPO / name).exists()] == []


def test_the_longest_unit_is_handed_out_first_and_the_unlisted_in_their_order() -> None:
    queue = _LongestFirst()
    for name in ("tests/unit/test_a.py", "tests/e2e", "tests/unit/test_b.py",
                 "tests/integration/test_sandbox.py"):  # fmt: skip
        queue[name] = {f"{name}::t": False}
    order = [queue.popitem(last=False)[0] for _ in range(len(queue))]
    timed = sorted(("tests/integration/test_sandbox.py", "tests/e2e"), key=SECONDS.__getitem__)
    assert order == [*reversed(timed), "tests/unit/test_a.py", "tests/unit/test_b.py"]
    assert SECONDS["tests/e2e"] > UNLISTED
