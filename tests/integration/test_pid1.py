"""`sharelatex-init run` as PID 1 of a fresh PID namespace, with real runit-style services.

Each test builds its service, startup and shutdown dirs under tmp_path, starts
`unshare --pid --fork --mount-proc python -m init run ...`, and watches from the host: the
namespace's processes through psutil, the services' marker files, the status file, the log.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import (
    CLEAN_ENV,
    INIT,
    PYTHON,
    Layout,
    Running,
    cmdlines,
    descendants,
    free_port,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.root

Start = Callable[..., Running]

# The end of a service script: wait forever, yet run `trap` actions as soon as a signal comes.
WAIT_FOREVER = "while :; do sleep 1000 & wait $!; done\n"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "init")


def boot(start: Start, layout: Layout, grace: float = 5.0, **env: str) -> Running:
    return start(layout.run_argv(grace), status_file=layout.status_file, env=env)


def stamps(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [float(line) for line in path.read_text().split()]


# -- reaping ----------------------------------------------------------------------------------


def test_orphans_of_a_service_are_reaped(start: Start, layout: Layout) -> None:
    m = layout.marks
    layout.service(
        "storm",
        f"""i=0
while [ $i -lt 100 ]; do (sleep 0.5 &) ; i=$((i + 1)); done
echo done > {m}/spawned
exec sleep 1000
""",
    )
    init = boot(start, layout)

    def orphan_of_init() -> bool:
        return any(
            p.ppid() == init.init_pid and p.cmdline()[:2] == ["sleep", "0.5"]
            for p in init.descendants()
            if p.is_running()
        )

    wait_for(orphan_of_init, 10, "a sleeper orphaned to the init")
    wait_for((m / "spawned").exists, 10, "the service to spawn its sleepers")

    def storm_over() -> bool:
        left = [c for c in cmdlines(init.descendants()) if c[:2] == ["sleep", "0.5"]]
        return not left and not init.zombies()

    wait_for(storm_over, 10, "every orphan to end and be reaped")
    assert init.zombies() == []
    init.signal(signal.SIGTERM)
    assert init.wait() == 0


# -- signals ----------------------------------------------------------------------------------


def test_hup_and_usr1_reach_every_service(start: Start, layout: Layout) -> None:
    m = layout.marks
    for name in ("a", "b"):
        layout.service(
            name,
            f"""trap 'echo HUP >> {m}/{name}' HUP
trap 'echo USR1 >> {m}/{name}' USR1
echo > {m}/{name}.ready
{WAIT_FOREVER}""",
        )
    init = boot(start, layout)
    wait_for(lambda: all((m / f"{n}.ready").exists() for n in "ab"), 10, "both services")

    for signum, word in ((signal.SIGHUP, "HUP"), (signal.SIGUSR1, "USR1")):
        init.signal(signum)
        for name in "ab":
            wait_for(
                lambda n=name, w=word: (
                    w in (m / n).read_text().split() if (m / n).exists() else False
                ),
                5,
                f"{word} at {name}",
            )
    assert (m / "a").read_text().split() == ["HUP", "USR1"]
    assert (m / "b").read_text().split() == ["HUP", "USR1"]
    assert init.proc.poll() is None, "a forwarded signal must not stop the init"
    assert "passing SIGHUP to the services" in init.log()
    init.signal(signal.SIGTERM)
    assert init.wait() == 0


# -- restarts ---------------------------------------------------------------------------------


def test_a_crashing_service_restarts_with_growing_delays(start: Start, layout: Layout) -> None:
    starts = layout.marks / "starts"
    layout.service("crash", f"date +%s.%N >> {starts}\nexit 1\n")
    init = start(
        layout.run_argv(5.0, "--log-format", "json"), status_file=layout.status_file, env={}
    )
    wait_for(lambda: len(stamps(starts)) >= 4, 8, "four starts")
    first = stamps(starts)[0]
    cpu_before = psutil.Process(init.init_pid).cpu_times()

    # Each delay as the init kept it: from its log of an exit to its log of the next start
    # (its own clock; a stamp the restarted service writes also counts fork and exec, which a
    # loaded machine stretches). Waited for in the log itself: the fourth start's stamp can be
    # written before the init has logged that start.
    def logged_delays() -> list[float]:
        events = [json.loads(line) for line in init.log().splitlines() if line.startswith("{")]
        crash = [e for e in events if e.get("source") == "crash" and "message" in e]
        ends = [e["ts"] for e in crash if "restarting in" in e["message"]]
        begins = [e["ts"] for e in crash if e["message"].startswith("started")]
        return [b - a for a, b in zip(ends, begins[1:], strict=False)][:3]

    delays = wait_for(lambda: len(logged_delays()) == 3 and logged_delays(), 5, "3 logged delays")
    for got, want in zip(delays, (0.5, 1.0, 2.0), strict=True):
        assert want - 0.05 <= got <= want + 0.4, f"restart delays {delays}"

    entry = init.wait_service("crash", "backoff")
    assert entry["restarts"] >= 3
    assert entry["quick_exits"] >= 3
    assert entry["last_exit"]["code"] == 1
    assert entry["next_start_at"] is not None

    # The command an operator runs, against the same file.
    shown = subprocess.run(
        [*INIT, "status", "--json", "--status-file", str(layout.status_file)],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=10,
    )
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    (crash,) = document["services"]
    assert crash["state"] == "backoff"
    assert crash["restarts"] >= 3
    text = subprocess.run(
        [*INIT, "status", "--status-file", str(layout.status_file)],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=10,
    )
    assert "crash loop" in text.stdout
    assert "backoff" in text.stdout

    # No spinning: the fifth start waits 4 s after the fourth, and the init is idle meanwhile.
    wait_for(lambda: time.time() >= first + 4.0, 5, "four seconds since the first start")
    assert len([t for t in stamps(starts) if t < first + 4.0]) <= 5
    cpu_after = psutil.Process(init.init_pid).cpu_times()
    assert (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system) < 0.3
    assert "(crash loop)" in init.log()
    init.signal(signal.SIGTERM)
    assert init.wait() == 0
    assert init.service("crash")["state"] == "down"


# -- shutdown ---------------------------------------------------------------------------------

GRACE = 30.0


def test_stop_runs_pre_shutdown_then_services_in_reverse_then_post(
    start: Start, layout: Layout
) -> None:
    m = layout.marks
    for name in ("a", "b", "c"):
        layout.service(
            name,
            f"""trap 'date +%s.%N > {m}/{name}.term; exit 0' TERM
echo > {m}/{name}.ready
{WAIT_FOREVER}""",
        )
    # The pre-shutdown script proves no service has been signalled yet: none has a .term file.
    write_script(layout.pre / "10-flush", f"date +%s.%N > {m}/pre\nls {m} > {m}/pre.seen\n")
    write_script(
        layout.post / "10-after",
        f"date +%s.%N > {m}/post\nps -eo args > {m}/post.ps\n",
    )
    # A grace far longer than the stop takes, even on a loaded machine (a full run once saw it
    # run out at 8 s, killing the post-shutdown script): what is held is that the init does not
    # wait for it.
    init = boot(start, layout, grace=GRACE)
    wait_for(lambda: all((m / f"{n}.ready").exists() for n in "abc"), 10, "the services")

    began = time.monotonic()
    init.signal(signal.SIGTERM)
    assert init.wait() == 0
    took = time.monotonic() - began

    term = {n: stamps(m / f"{n}.term")[0] for n in "abc"}
    assert term["c"] < term["b"] < term["a"], f"stop order {sorted(term, key=term.__getitem__)}"
    assert stamps(m / "pre")[0] < term["c"]
    assert not any(line.endswith(".term") for line in (m / "pre.seen").read_text().split())
    assert stamps(m / "post")[0] > term["a"]
    # Inside the namespace only the init, the script and its ps remain: no service, no sleep.
    seen = (m / "post.ps").read_text().splitlines()[1:]
    others = [
        line
        for line in seen
        if " -m init run " not in line and "10-after" not in line and line != "ps -eo args"
    ]
    assert others == [], f"still running when post-shutdown ran: {others}"
    # Stopped as soon as the last service was gone (~0.3 s quiet), not at the end of the grace.
    assert took < GRACE / 2, f"stop took {took:.2f} s of a {GRACE} s grace"
    assert init.service("a")["state"] == "down"


def test_a_service_ignoring_sigterm_is_killed_inside_the_grace(
    start: Start, layout: Layout
) -> None:
    m = layout.marks
    # Started first, so stopped last, with what is left of the grace period once b is down.
    layout.service("a-stubborn", f"trap '' TERM\necho > {m}/a.ready\nwhile :; do sleep 1; done\n")
    layout.service("b-polite", f"trap 'exit 0' TERM\necho > {m}/b.ready\n{WAIT_FOREVER}")
    grace = 2.0
    init = boot(start, layout, grace=grace)
    wait_for(lambda: (m / "a.ready").exists() and (m / "b.ready").exists(), 10, "the services")

    began = time.monotonic()
    init.signal(signal.SIGTERM)
    code = init.wait(grace + 5)
    took = time.monotonic() - began
    assert code == 0
    assert grace - 0.3 <= took <= grace + 1.0, f"stop took {took:.2f} s, grace {grace}"
    log = init.log()
    assert "a-stubborn: warning: did not stop in time; killing its process group" in log
    assert "killed after the grace period: a-stubborn" in log
    assert "b-polite: stopped: exited with status 0" in log
    assert init.service("a-stubborn")["last_exit"]["signal"] == signal.SIGKILL


def test_as_pid1_leftover_processes_are_ended(start: Start, layout: Layout) -> None:
    nonce = f"1000.{random.randrange(10**8, 10**9)}"
    m = layout.marks
    # Two escape their service's group: one ignores SIGTERM, one ends cleanly on it.
    polite = f"trap 'echo > {m}/polite.term; exit 0' TERM; echo > {m}/polite.ready; {WAIT_FOREVER}"
    layout.service(
        "escapes",
        f"""( trap '' TERM; setsid sleep {nonce} & )
( setsid sh -c "{polite}" & )
echo > {m}/ready
{WAIT_FOREVER}""",
    )
    init = boot(start, layout, grace=3)
    wait_for(lambda: (m / "ready").exists() and (m / "polite.ready").exists(), 10, "the service")

    def leftover() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if p.info["cmdline"] == ["sleep", nonce]:
                found.append(p)
        return found

    (sleeper,) = wait_for(leftover, 5, "the escaped sleeper")
    wait_for(lambda: sleeper.ppid() == init.init_pid, 5, "the sleeper orphaned to the init")
    began = time.monotonic()
    init.signal(signal.SIGTERM)
    assert init.wait(10) == 0
    assert time.monotonic() - began < 3 + 1.0 + 1.5  # grace + KILL_ALL_PROCESSES_TIMEOUT
    assert leftover() == []
    # Ended by the init with SIGTERM first (the kernel's SIGKILL at PID 1's exit gives no chance).
    assert (m / "polite.term").exists()
    assert "ending the remaining processes" in init.log()


# -- startup ----------------------------------------------------------------------------------


def test_a_failing_startup_script_stops_the_boot(start: Start, layout: Layout) -> None:
    m = layout.marks
    write_script(layout.startup / "10-first", f"echo > {m}/first\n")
    write_script(layout.startup / "20-breaks", "echo about to fail\nexit 3\n")
    write_script(layout.startup / "30-never", f"echo > {m}/third\n")
    layout.service("web", f"echo > {m}/web\n{WAIT_FOREVER}")
    init = boot(start, layout)
    assert init.wait() == 1
    log = init.log()
    assert (m / "first").exists()
    assert not (m / "third").exists()
    assert not (m / "web").exists()
    failure = [line for line in log.splitlines() if "20-breaks" in line and "status 3" in line]
    assert failure, log
    assert "not starting the services" in failure[0]
    assert "Traceback" not in log
    assert "20-breaks exited with status 3" in init.status()["message"]


def test_container_environment_is_exported_and_grows_from_startup_scripts(
    start: Start, layout: Layout
) -> None:
    m = layout.marks
    env_dir = layout.env
    write_script(layout.startup / "10-secret", f"printf 's3cret value' > {env_dir}/NEW_SECRET\n")
    write_script(layout.startup / "20-sees", f'printf "%s" "$NEW_SECRET" > {m}/seen\n')
    # Written whole, then renamed: the test may look the moment the file appears.
    layout.service("web", f"env > {m}/web.tmp && mv {m}/web.tmp {m}/web.env\n{WAIT_FOREVER}")
    init = boot(start, layout, GREETING="hello world")
    wait_for((m / "web.env").exists, 10, "the service")

    assert (env_dir / "GREETING").read_text() == "hello world"
    assert stat_mode(env_dir) == 0o700
    assert (m / "seen").read_text() == "s3cret value"
    seen_by_service = (m / "web.env").read_text().splitlines()
    assert "NEW_SECRET=s3cret value" in seen_by_service
    assert "GREETING=hello world" in seen_by_service
    shell = env_dir.with_name("container_environment.sh").read_text()
    assert "export NEW_SECRET='s3cret value'\n" in shell
    assert "export GREETING='hello world'\n" in shell
    as_json = json.loads(env_dir.with_name("container_environment.json").read_text())
    assert as_json["NEW_SECRET"] == "s3cret value"
    # The .sh form is what services source: it must give back the same values.
    sourced = subprocess.run(
        ["sh", "-c", f'. {env_dir}.sh && printf "%s" "$NEW_SECRET"'],
        capture_output=True,
        text=True,
        env={},
        timeout=10,
    )
    assert sourced.stdout == "s3cret value"
    init.signal(signal.SIGTERM)
    assert init.wait() == 0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_init_works_from_root_and_its_scripts_from_the_callers_dir(
    start: Start, layout: Layout
) -> None:
    m = layout.marks
    write_script(
        layout.startup / "10-where",
        f"readlink /proc/$PPID/cwd > {m}/init-cwd\npwd > {m}/script-cwd\n",
    )
    # Written whole, then renamed: "up" means started, not that the file is there yet.
    layout.service("where", f"pwd > {m}/cwd.tmp && mv {m}/cwd.tmp {m}/service-cwd\n{WAIT_FOREVER}")
    # Every path relative to the caller's dir: each must keep its meaning after the init leaves.
    argv = [
        str(Path(a).relative_to(layout.base)) if a.startswith(f"{layout.base}/") else a
        for a in layout.run_argv()
    ]
    assert "service" in argv and "run/status.json" in argv
    init = start(argv, status_file=layout.status_file, cwd=layout.base)
    init.wait_service("where", "up")
    wait_for((m / "service-cwd").exists, 10, "the service to write its cwd")
    assert os.readlink(f"/proc/{init.init_pid}/cwd") == "/"
    assert (m / "init-cwd").read_text().strip() == "/"
    assert (m / "script-cwd").read_text().strip() == str(layout.base)
    assert (m / "service-cwd").read_text().strip() == str(layout.services / "where")
    init.signal(signal.SIGTERM)
    assert init.wait() == 0
    assert init.status()["phase"] == "stopped"


# -- staying small and quiet -----------------------------------------------------------------

SHOW_MODULES = """
import json, sys
from init import cli
code = cli.main(sys.argv[1:])
third_party = sorted(
    {m.split(".")[0] for m in sys.modules}
    - set(sys.stdlib_module_names) - {"init", "__main__"}
    - {"_distutils_hack"}  # the venv's setuptools hook, loaded by site before any code
)
third_party = [m for m in third_party if not m.startswith("__editable__")]
print("MODULES " + json.dumps({"code": code, "third_party": third_party}), flush=True)
"""


def test_the_pid1_path_imports_no_docker_or_requests(start: Start, layout: Layout) -> None:
    # The service asks its parent, the init, to stop: a whole run, start to exit, as PID 1.
    layout.service("web", f'kill -TERM "$PPID"\n{WAIT_FOREVER}')
    argv = [PYTHON, "-c", SHOW_MODULES, *layout.run_argv(3)[3:]]
    init = start(argv, status_file=layout.status_file)
    assert init.wait() == 0
    (line,) = [ln for ln in init.log().splitlines() if ln.startswith("MODULES ")]
    report = json.loads(line.removeprefix("MODULES "))
    assert report["code"] == 0
    assert "web: started" in init.log()
    assert not {"docker", "requests", "urllib3", "tenacity"} & set(report["third_party"])
    assert set(report["third_party"]) <= {"psutil"}, report


def test_an_idle_init_does_not_wake_up(start: Start, layout: Layout) -> None:
    layout.service("web", f"{WAIT_FOREVER}")
    init = boot(start, layout)
    # The status write for "up" is the last thing the init does on its own.
    init.wait_service("web", "up")
    me = psutil.Process(init.init_pid)
    # Let it finish what follows that write (and be scheduled back in on a busy machine):
    # settled once two readings 0.3 s apart agree.
    readings = [me.num_ctx_switches()]

    def settled() -> bool:
        time.sleep(0.3)
        readings.append(me.num_ctx_switches())
        return readings[-1] == readings[-2]

    wait_for(settled, 10, "the init to settle")
    before = me.num_ctx_switches()
    window_end = time.monotonic() + 2.0
    wait_for(lambda: time.monotonic() >= window_end, 3, "the measuring window")
    after = me.num_ctx_switches()
    assert after.voluntary - before.voluntary <= 1, (before, after)
    assert after.involuntary - before.involuntary <= 1, (before, after)
    init.signal(signal.SIGTERM)
    assert init.wait() == 0


# -- exit statuses ----------------------------------------------------------------------------


def test_sigint_stops_with_status_0(start: Start, layout: Layout) -> None:
    m = layout.marks
    layout.service("web", f"echo > {m}/ready\n{WAIT_FOREVER}")
    init = boot(start, layout)
    wait_for((m / "ready").exists, 10, "the service")
    init.signal(signal.SIGINT)
    assert init.wait() == 0
    assert "SIGINT received; stopping" in init.log()


def test_bad_configuration_exits_78_with_one_line(start: Start, layout: Layout) -> None:
    layout.service("web", f"echo > {layout.marks}/web\n{WAIT_FOREVER}")
    init = boot(start, layout, SANDBOXED_COMPILES="maybe")
    assert init.wait() == 78
    lines = [ln for ln in init.log().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "SANDBOXED_COMPILES" in lines[0]
    assert "maybe" in lines[0]
    assert not (layout.marks / "web").exists()


def test_a_bad_down_signal_exits_78_before_anything_starts(start: Start, layout: Layout) -> None:
    layout.service("web", f"echo > {layout.marks}/web\n{WAIT_FOREVER}", down_signal="SIGNOPE")
    write_script(layout.startup / "10-mark", f"echo > {layout.marks}/startup")
    init = boot(start, layout)
    assert init.wait() == 78
    log = init.log()
    assert "SIGNOPE" in log and "down-signal" in log
    assert not (layout.marks / "web").exists()
    assert not (layout.marks / "startup").exists()


def test_not_pid1_the_init_adopts_orphans_as_subreaper(start: Start, layout: Layout) -> None:
    m = layout.marks
    nonce = f"30.{random.randrange(10**8, 10**9)}"
    layout.service("web", f"(sleep {nonce} &)\necho > {m}/ready\n{WAIT_FOREVER}")
    init = start(layout.run_argv(3), pid1=False, status_file=layout.status_file)
    wait_for((m / "ready").exists, 10, "the service")
    orphan = wait_for(
        lambda: [p for p in descendants(init.init_pid) if p.cmdline() == ["sleep", nonce]],
        5,
        "the orphan",
    )[0]
    assert orphan.ppid() == init.init_pid
    orphan.kill()
    wait_for(lambda: not psutil.pid_exists(orphan.pid), 5, "the orphan to be reaped")
    init.signal(signal.SIGTERM)
    assert init.wait() == 0


def test_runit_layout_down_finish_and_down_signal(start: Start, layout: Layout) -> None:
    m = layout.marks
    layout.service("idle", f"echo > {m}/idle\n{WAIT_FOREVER}", down=True)
    once = layout.service(
        "once",
        f"""echo hello from once
if [ -e {m}/once.ran ]; then
echo > {m}/once.again
{WAIT_FOREVER}fi
echo > {m}/once.ran
exit 7
""",
    )
    write_script(once / "finish", f'echo "$1 $2" >> {m}/once.finish\n')
    layout.service(
        "quitter",
        f"trap 'echo QUIT > {m}/quitter; exit 0' QUIT\necho > {m}/quitter.ready\n{WAIT_FOREVER}",
        down_signal="SIGQUIT",
    )
    init = boot(start, layout)
    wait_for((m / "quitter.ready").exists, 10, "quitter")
    wait_for((m / "once.again").exists, 10, "once restarted")
    assert init.service("once")["restarts"] == 1
    assert (m / "once.finish").read_text().splitlines() == ["7 0"]
    assert "once | hello from once" in init.log()
    assert init.service("idle")["state"] == "down"
    assert not (m / "idle").exists()

    began = time.monotonic()
    init.signal(signal.SIGTERM)
    assert init.wait() == 0
    assert (m / "quitter").read_text() == "QUIT\n"
    # quitter's `sleep 1000 &` ignores SIGQUIT (sh's background jobs do): what a service leaves
    # behind in its group is told to stop with SIGTERM, not waited on for the whole grace.
    assert time.monotonic() - began < 2.0, init.log()
    # The finish script runs after the stop too: killed by SIGTERM gives "-1 15".
    assert (m / "once.finish").read_text().splitlines() == ["7 0", "-1 15"]


def test_a_stop_signal_during_a_startup_script_ends_the_boot(start: Start, layout: Layout) -> None:
    m = layout.marks
    write_script(layout.startup / "10-slow", f"echo > {m}/slow\nexec sleep 1000\n")
    layout.service("web", f"echo > {m}/web\n{WAIT_FOREVER}")
    init = boot(start, layout, grace=5)
    wait_for((m / "slow").exists, 10, "the startup script")
    began = time.monotonic()
    init.signal(signal.SIGTERM)
    assert init.wait() == 0
    assert time.monotonic() - began < 2.0
    assert not (m / "web").exists()
    assert "ending " in init.log()


def test_a_second_sigterm_cuts_the_grace_short(start: Start, layout: Layout) -> None:
    m = layout.marks
    layout.service("stubborn", f"trap '' TERM\necho > {m}/ready\nwhile :; do sleep 1; done\n")
    init = boot(start, layout, grace=20)
    wait_for((m / "ready").exists, 10, "the service")
    began = time.monotonic()
    init.signal(signal.SIGTERM)
    wait_for(lambda: "stubborn: stopping" in init.log(), 5, "the stop to begin")
    init.signal(signal.SIGTERM)
    assert init.wait(10) == 0
    assert time.monotonic() - began < 3.0
    assert "SIGTERM again; cutting the grace period short" in init.log()


def test_the_optional_http_endpoint_serves_the_probes_and_stops_with_the_init(
    start: Start, layout: Layout
) -> None:
    import urllib.error
    import urllib.request

    port = free_port()  # the init's namespace shares the network with the test
    layout.service("web", WAIT_FOREVER)
    init = boot(start, layout, OVERLEAF_INIT_HTTP_ADDRESS=f"127.0.0.1:{port}")
    init.wait_service("web", "up")

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    wait_for(lambda: get("/healthz")[0] == 200, 10, "the endpoint")
    assert get("/readyz") == (200, b"ready: yes: running (compiles not sandboxed)\n")
    status, body = get("/status")
    assert status == 200 and {s["name"] for s in json.loads(body)["services"]} >= {"web"}
    assert init.service("http-status")["state"] == "up"
    init.signal(signal.SIGTERM)
    assert init.wait() == 0
    assert get("/healthz")[0] == 0  # nothing listens any more
