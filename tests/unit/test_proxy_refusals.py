"""What the engine proxy refused reaches the operator: kept in a file beside the status, shown by
`status` and `doctor` (only this start's), one line each with the caller's uid."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

from init import doctor, status
from init.checks import Status as Verdict
from init.core.log import Log
from init.core.status_file import StatusDocument, read_refusals, refusals_path
from init.proxy.server import Refusals


def test_a_refusal_is_kept_and_a_repeat_is_counted_not_kept(tmp_path: Path) -> None:
    keep = tmp_path / "proxy-refusals.json"
    log = io.StringIO()
    refusals = Refusals(Log(log), keep)
    refusals.note(33, 100, "POST /containers/create", "Privileged is refused")
    refusals.note(33, 101, "POST /containers/create", "Privileged is refused")
    refusals.note(0, 102, "POST /images/create", "pulling images is refused")
    kept = read_refusals(keep)
    assert [(r.uid, r.what, r.reason) for r in kept] == [
        (33, "POST /containers/create", "Privileged is refused"),
        (0, "POST /images/create", "pulling images is refused"),
    ]
    assert log.getvalue().count("refused uid 33") == 1  # the repeat is not logged either


def test_status_and_doctor_show_this_starts_refusals(tmp_path: Path) -> None:
    status_file = tmp_path / "status.json"
    now = time.time()
    document = StatusDocument(
        pid=1, phase="running", started_at=now - 5, engine={"mode": "dind", "state": "ready",
                                                             "ready": True},
    )  # fmt: skip
    status_file.write_text(json.dumps(document.to_json()))
    earlier = {"at": now - 60, "uid": 33, "what": "GET /old", "reason": "before this start"}
    latest = {"at": now - 1, "uid": 33, "what": "POST /containers/create",
              "reason": "Privileged is refused", "repeats": 2}  # fmt: skip
    refusals_path(status_file).write_text(json.dumps([earlier, latest]))
    shown = status.Status.of(
        StatusDocument.from_json(json.loads(status_file.read_text())),
        refusals=read_refusals(refusals_path(status_file)),
    )
    text = status.format_text(shown, now=now)
    assert (
        "proxy: refused 1 call(s) since the start; last: uid 33: POST /containers/create: "
        "Privileged is refused (and 2 more like it)"
    ) in text
    assert [r["what"] for r in shown.to_json()["proxy_refusals"]] == ["POST /containers/create"]

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "docker.sock"))
    listener.listen(1)
    try:
        check = doctor.proxy_check(status_file)
    finally:
        listener.close()
    assert check.status is Verdict.WARN and "refused 1 call(s)" in check.message
    (tmp_path / "docker.sock").unlink()
    assert doctor.proxy_check(status_file).status is Verdict.FAIL  # nothing answers
    status_file.unlink()  # no init running (a preflight): nothing to ask yet
    assert doctor.proxy_check(status_file).status is Verdict.OK
