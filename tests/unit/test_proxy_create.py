"""Every create held to the compile profile: the init's own and Server Pro's pass (rewritten
to the profile), each escape is refused with its reason."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from init.compiles.paths import CompileDir
from init.compiles.profile import Job, container_spec, load_seccomp
from init.compiles.settings import Limits
from init.engine.client import COMPILE_LABEL, EXPIRES_LABEL
from init.proxy import body, create
from init.proxy.binds import Root, check_source
from init.proxy.decision import Refused
from init.proxy.settings import ProxyConfig

NOW = 1_000_000.0
LIMITS = Limits(memory=1 << 30, pids=256, cpus=1.0, tmpfs=64 << 20, timeout=60.0)


@pytest.fixture
def config(tmp_path: Path) -> ProxyConfig:
    (tmp_path / "compiles" / "p1").mkdir(parents=True)
    (tmp_path / "output" / "p1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return ProxyConfig(
        listen=tmp_path / "proxy.sock",
        engine=tmp_path / "docker.sock",
        images=("quay.io/sharelatex/texlive-full:2024.1", "busybox:test"),
        roots=(
            Root(PurePosixPath(tmp_path / "compiles"), PurePosixPath(tmp_path / "compiles")),
            Root(PurePosixPath(tmp_path / "output"), PurePosixPath(tmp_path / "output")),
        ),
        limits=LIMITS,
    )


def check(document: Any, config: ProxyConfig) -> create.Outcome:
    return create.check(document, config, now=NOW)


def server_pro(config: ProxyConfig) -> dict[str, Any]:
    """What Server Pro's DockerRunner.js sends (Overleaf's last public copy)."""
    compiles = config.roots[0].host
    return {
        "Cmd": ["latexmk", "-cd", "/compile/main.tex"],
        "Image": "quay.io/sharelatex/texlive-full:2024.1",
        "WorkingDir": "/compile",
        "NetworkDisabled": True,
        "Memory": 1024 * 1024 * 1024 * 1024,
        "User": "tex",
        "Env": ["HOME=/tmp", "CLSI=1", "PATH=/usr/bin:/bin"],
        "HostConfig": {
            "Binds": [f"{compiles}/p1:/compile:rw"],
            "LogConfig": {"Type": "none", "Config": {}},
            "Ulimits": [{"Name": "cpu", "Soft": 65, "Hard": 70}],
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
        },
    }


def cli_run(**host: Any) -> dict[str, Any]:
    """The shape of `docker run --user 1000 busybox:test` (every field, zero when unused)."""
    host_config = {
        "Binds": None,
        "ContainerIDFile": "",
        "LogConfig": {"Type": "", "Config": {}},
        "NetworkMode": "default",
        "PortBindings": {},
        "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
        "AutoRemove": True,
        "VolumeDriver": "",
        "VolumesFrom": None,
        "ConsoleSize": [40, 120],
        "CapAdd": None,
        "CapDrop": None,
        "CgroupnsMode": "",
        "Dns": [],
        "DnsOptions": [],
        "DnsSearch": [],
        "ExtraHosts": None,
        "GroupAdd": None,
        "IpcMode": "",
        "Cgroup": "",
        "Links": None,
        "OomScoreAdj": 0,
        "PidMode": "",
        "Privileged": False,
        "PublishAllPorts": False,
        "ReadonlyRootfs": False,
        "SecurityOpt": None,
        "UTSMode": "",
        "UsernsMode": "",
        "ShmSize": 0,
        "Isolation": "",
        "CpuShares": 0,
        "Memory": 0,
        "NanoCpus": 0,
        "CgroupParent": "",
        "BlkioWeight": 0,
        "BlkioWeightDevice": [],
        "Devices": [],
        "DeviceCgroupRules": None,
        "DeviceRequests": None,
        "MemoryReservation": 0,
        "MemorySwap": 0,
        "MemorySwappiness": None,
        "OomKillDisable": None,
        "PidsLimit": None,
        "Ulimits": [],
        "CpuCount": 0,
        "CpuPercent": 0,
        "IOMaximumIOps": 0,
        "IOMaximumBandwidth": 0,
        "MaskedPaths": None,
        "ReadonlyPaths": None,
    }
    host_config.update(host)
    return {
        "Hostname": "",
        "Domainname": "",
        "User": "1000",
        "AttachStdin": False,
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "Env": None,
        "Cmd": ["true"],
        "Image": "busybox:test",
        "Volumes": {},
        "WorkingDir": "",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": {},
        "HostConfig": host_config,
        "NetworkingConfig": {"EndpointsConfig": {}},
    }


# -- what passes --------------------------------------------------------------------------------


def test_the_inits_own_profile_passes_untouched(config: ProxyConfig) -> None:
    project = Path(config.roots[0].here) / "p1"
    directory = CompileDir(project, project, "p1", 33, 33)
    job = Job(directory, ("latexmk",), "busybox:test", compile_id="c1")
    spec = container_spec(job, LIMITS, load_seccomp(lambda _: None), now=NOW)
    sent = spec.create_body()
    outcome = check(copy.deepcopy(sent), config)
    assert outcome.rewritten == []
    got = outcome.document
    assert got["Labels"] == sent["Labels"]
    assert got["HostConfig"]["Mounts"] == sent["HostConfig"]["Mounts"]
    for kept in ("Ulimits", "SecurityOpt", "Memory", "PidsLimit", "NanoCpus", "LogConfig"):
        assert got["HostConfig"][kept] == sent["HostConfig"][kept], kept


def test_server_pros_runner_passes_brought_to_the_profile(config: ProxyConfig) -> None:
    outcome = check(server_pro(config), config)
    got, host = outcome.document, outcome.document["HostConfig"]
    assert "Memory" not in got  # its 1 TiB, at the top level
    assert (host["Memory"], host["MemorySwap"]) == (LIMITS.memory, LIMITS.memory)
    assert host["PidsLimit"] == LIMITS.pids and host["NanoCpus"] == 10**9
    assert host["NetworkMode"] == "none" and got["NetworkDisabled"] is True
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={64 << 20}"}
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Binds"] == [f"{config.roots[0].host}/p1:/compile:rw"]
    assert got["Labels"][COMPILE_LABEL] == "1"
    assert float(got["Labels"][EXPIRES_LABEL]) == NOW + LIMITS.deadlines.lifetime
    assert got["User"] == "tex" and got["WorkingDir"] == "/compile"
    assert "Memory dropped" in outcome.rewritten


def test_the_docker_clis_zero_values_pass_and_are_dropped(config: ProxyConfig) -> None:
    outcome = check(cli_run(), config)
    host = outcome.document["HostConfig"]
    assert set(host) == {
        "AutoRemove",
        "ConsoleSize",
        "NetworkMode",
        "CapDrop",
        "SecurityOpt",
        "ReadonlyRootfs",
        "Tmpfs",
        "Memory",
        "MemorySwap",
        "PidsLimit",
        "NanoCpus",
    }
    assert "NetworkingConfig" not in outcome.document


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("Memory", 8 << 30, 1 << 30),
        ("Memory", 256 << 20, 256 << 20),
        ("PidsLimit", -1, 256),
        ("PidsLimit", 64, 64),
        ("NanoCpus", 4 * 10**9, 10**9),
        ("ShmSize", 1 << 40, 64 << 20),
    ],
)
def test_limits_are_capped_at_the_inits(
    config: ProxyConfig, field: str, value: int, expected: int
) -> None:
    host = check(cli_run(**{field: value}), config).document["HostConfig"]
    assert host[field] == expected
    assert host["MemorySwap"] == host["Memory"]


@pytest.mark.parametrize(
    ("host", "gone"),
    [
        ({"MaskedPaths": []}, "MaskedPaths"),  # systempaths=unconfined
        ({"ReadonlyPaths": []}, "ReadonlyPaths"),
        ({"RestartPolicy": {"Name": "always"}}, "RestartPolicy"),
        ({"PortBindings": {"80/tcp": [{"HostPort": "80"}]}}, "PortBindings"),
        ({"OomScoreAdj": -1000}, "OomScoreAdj"),
        ({"CpuQuota": 10**9}, "CpuQuota"),
    ],
)
def test_what_means_nothing_here_or_widens_is_dropped(
    config: ProxyConfig, host: dict[str, Any], gone: str
) -> None:
    outcome = check(cli_run(**host), config)
    assert gone not in outcome.document["HostConfig"]
    assert any(gone in note for note in outcome.rewritten)


def test_network_modes_other_than_host_become_none(config: ProxyConfig) -> None:
    for mode in ("bridge", "default", "mynet"):
        assert (
            check(cli_run(NetworkMode=mode), config).document["HostConfig"]["NetworkMode"] == "none"
        )


def test_tmpfs_mounts_are_capped_nosuid_nodev(config: ProxyConfig) -> None:
    tmpfs = {"/tmp": "rw,exec,suid,size=10g", "/run": "size=1m"}
    host = check(cli_run(Tmpfs=tmpfs), config).document["HostConfig"]
    assert host["Tmpfs"] == {
        "/tmp": f"rw,exec,nosuid,nodev,size={64 << 20}",
        "/run": f"nosuid,nodev,size={1 << 20}",
    }


def test_the_expiry_label_is_clamped_and_the_compile_label_forced(config: ProxyConfig) -> None:
    labels = {COMPILE_LABEL: "0", EXPIRES_LABEL: "99999999999", "mine": "x"}
    got = check(dict(cli_run(), Labels=labels), config).document["Labels"]
    assert got == {
        COMPILE_LABEL: "1",
        EXPIRES_LABEL: f"{NOW + LIMITS.deadlines.lifetime:.0f}",
        "mine": "x",
    }


def test_security_options_keep_what_is_stricter(config: ProxyConfig) -> None:
    ours = load_seccomp(lambda _: None)
    options = [
        f"seccomp={ours}",
        "apparmor=docker-default",
        "label=level:s0:c1",
        "no-new-privileges:true",
    ]
    got = check(cli_run(SecurityOpt=options), config).document["HostConfig"]["SecurityOpt"]
    assert got == [
        "no-new-privileges",
        f"seccomp={ours}",
        "apparmor=docker-default",
        "label=level:s0:c1",
    ]


# -- what is refused ----------------------------------------------------------------------------


def weak_profile(**change: Any) -> str:
    profile: dict[str, Any] = {"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
    if not any(k.lower() == "defaultaction" for k in change):
        profile["defaultAction"] = "SCMP_ACT_ERRNO"
    profile.update(change)
    return "seccomp=" + json.dumps(profile)


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ({"Privileged": True}, "privileged"),
        ({"CapAdd": ["SYS_ADMIN"]}, "capabilities"),
        ({"SecurityOpt": ["seccomp=unconfined"]}, "seccomp=unconfined"),
        ({"SecurityOpt": ["seccomp:unconfined"]}, "seccomp=unconfined"),
        ({"SecurityOpt": ["apparmor=unconfined"]}, "apparmor=unconfined"),
        ({"SecurityOpt": ["label=disable"]}, "label=disable"),
        ({"SecurityOpt": ["label:type:spc_t"]}, "label=type:spc_t"),
        ({"SecurityOpt": ["disable"]}, "disable"),
        ({"SecurityOpt": ["no-new-privileges:false"]}, "cannot be turned off"),
        ({"SecurityOpt": ["no-new-privileges=0"]}, "cannot be turned off"),
        ({"SecurityOpt": ["writable-cgroups=true"]}, "writable-cgroups"),
        ({"SecurityOpt": [weak_profile(defaultAction="SCMP_ACT_ALLOW")]}, "by default"),
        ({"SecurityOpt": [weak_profile(defaultaction="SCMP_ACT_LOG")]}, "by default"),
        (
            {
                "SecurityOpt": [
                    weak_profile(
                        syscalls=[{"names": ["unshare", "mount"], "action": "SCMP_ACT_ALLOW"}]
                    )
                ]
            },
            "allows mount, unshare",
        ),
        ({"SecurityOpt": [weak_profile(listenerPath="/run/agent.sock")]}, "agent"),
        ({"NetworkMode": "host"}, "network mode 'host'"),
        ({"NetworkMode": "container:site"}, "network mode 'container:site'"),
        ({"PidMode": "host"}, "PidMode"),
        ({"PidMode": "container:site"}, "PidMode"),
        ({"IpcMode": "host"}, "IpcMode"),
        ({"UTSMode": "host"}, "UTSMode"),
        ({"UsernsMode": "host"}, "UsernsMode"),
        ({"CgroupnsMode": "host"}, "CgroupnsMode"),
        (
            {
                "Devices": [
                    {
                        "PathOnHost": "/dev/sda",
                        "PathInContainer": "/dev/sda",
                        "CgroupPermissions": "rwm",
                    }
                ]
            },
            "Devices",
        ),
        ({"DeviceCgroupRules": ["a *:* rwm"]}, "DeviceCgroupRules"),
        ({"DeviceRequests": [{"Driver": "nvidia", "Count": -1}]}, "DeviceRequests"),
        ({"VolumesFrom": ["site"]}, "VolumesFrom"),
        ({"VolumeDriver": "evil"}, "VolumeDriver"),
        ({"Sysctls": {"kernel.shm_rmid_forced": "1"}}, "Sysctls"),
        ({"CgroupParent": "/"}, "CgroupParent"),
        ({"Runtime": "nvidia"}, "runtime"),
        (
            {"LogConfig": {"Type": "syslog", "Config": {"syslog-address": "tcp://10.0.0.1:514"}}},
            "log driver",
        ),
        ({"Binds": ["/:/host"]}, "not under"),
        ({"Binds": ["/var/run/docker.sock:/var/run/docker.sock"]}, "not under"),
        ({"Binds": ["site-data:/data"]}, "not an absolute path"),
        (
            {
                "Mounts": [
                    {
                        "Type": "volume",
                        "Source": "v",
                        "Target": "/x",
                        "VolumeOptions": {
                            "DriverConfig": {
                                "Name": "local",
                                "Options": {"type": "none", "o": "bind", "device": "/"},
                            }
                        },
                    }
                ]
            },
            "mount type 'volume'",
        ),
        ({"Mounts": [{"Type": "tmpfs", "Target": "/x"}]}, "mount type 'tmpfs'"),
        ({"Annotations": {"io.kubernetes.cri-o.Devices": "/dev/sda"}}, "Annotations"),
        ({"Frobnicate": True}, "HostConfig.Frobnicate is not part"),
        ({"Tmpfs": {f"/t{i}": "" for i in range(5)}}, "more than 4 tmpfs"),
    ],
)
def test_escapes_are_refused(config: ProxyConfig, host: dict[str, Any], why: str) -> None:
    with pytest.raises(Refused) as refused:
        check(cli_run(**host), config)
    assert why in refused.value.reason


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"User": ""}, "not root"),
        ({"User": "root"}, "is root"),
        ({"User": "0:0"}, "is root"),
        ({"User": "000"}, "is root"),
        ({"User": "1000:0"}, "is root"),
        ({"User": "1000:root"}, "is root"),
        ({"Image": "alpine"}, "not an allowed"),
        ({"Image": "evil.example/busybox:test"}, "not an allowed"),
        ({"Image": "busybox"}, "not an allowed"),  # :latest, not :test
        ({"Privileged": True}, "Privileged is not part"),  # the top-level (pre-1.24) spelling
        ({"Binds": ["/:/host"]}, "Binds is not part"),
        ({"Labels": {"a": 1}}, "Labels must map"),
        ({"Volumes": {"/x": {"Driver": "evil"}}}, "anonymous volumes only"),
    ],
)
def test_top_level_escapes_are_refused(
    config: ProxyConfig, change: dict[str, Any], why: str
) -> None:
    with pytest.raises(Refused) as refused:
        check({**cli_run(), **change}, config)
    assert why in refused.value.reason


def test_the_image_allow_list_reads_names_as_the_engine_does(config: ProxyConfig) -> None:
    assert check({**cli_run(), "Image": "docker.io/library/busybox:test"}, config)
    assert create.image_key("busybox") == "docker.io/library/busybox:latest"
    assert create.image_key("quay.io/a/b:1@sha256:00") == "quay.io/a/b:1@sha256:00"
    assert create.image_key("localhost:5000/x") == "localhost:5000/x:latest"


HEAD = '{"Image": "busybox:test", "User": "1000", '


@pytest.mark.parametrize(
    "text",
    [
        HEAD + '"HostConfig": {"Privileged": false, "privileged": true}}',
        HEAD + '"HostConfig": {"Privileged": false, "Privileged": true}}',
        HEAD + '"Image": "alpine"}',
        HEAD + '"HostConfig": {"\u212aernelMemory": 1, "KernelMemory": 0}}',  # the Kelvin sign
    ],
)
def test_repeated_keys_in_any_case_are_refused(text: str) -> None:
    with pytest.raises(Refused, match="given twice"):
        body.loads(text.encode())


def test_keys_in_another_case_are_read_as_the_engine_reads_them(config: ProxyConfig) -> None:
    with pytest.raises(Refused, match="privileged"):
        check(
            body.loads(
                b'{"image": "busybox:test", "user": "1000", "hostconfig": {"PRIVILEGED": true}}'
            ),
            config,
        )
    # \u017f is the long s: Go folds it to s, as casefold does.
    sneaky = HEAD + '"HostConfig": {"\u017fecurityOpt": ["seccomp=unconfined"]}}'
    with pytest.raises(Refused, match="unconfined"):
        check(body.loads(sneaky.encode()), config)
    sent = check(
        body.loads(
            b'{"image": "busybox:test", "user": "1000", "hostconfig": {"networkmode": "bridge"}}'
        ),
        config,
    )
    assert (
        sent.document["HostConfig"]["NetworkMode"] == "none" and "hostconfig" not in sent.document
    )


# -- binds --------------------------------------------------------------------------------------


def test_a_bind_through_a_link_planted_under_the_root_is_refused(config: ProxyConfig) -> None:
    root = Path(config.roots[0].here)
    (root / "evil").symlink_to("/")
    (root / "p1" / "up").symlink_to("../..")
    for source in (root / "evil", root / "evil" / "etc", root / "p1" / "up"):
        with pytest.raises(Refused, match="outside"):
            check_source(str(source), config.roots)


def test_a_link_that_stays_under_the_root_is_sent_resolved(config: ProxyConfig) -> None:
    root = Path(config.roots[0].here)
    (root / "alias").symlink_to("p1")
    assert check_source(str(root / "alias"), config.roots) == str(root / "p1")


@pytest.mark.parametrize("suffix", ["", "/", "/p1/..", "/nothing", "/p1/file"])
def test_roots_dotdot_missing_and_files_are_refused(config: ProxyConfig, suffix: str) -> None:
    root = Path(config.roots[0].here)
    (root / "p1" / "file").write_text("x")
    with pytest.raises(Refused):
        check_source(f"{root}{suffix}", config.roots)


def test_a_dir_holding_the_engine_socket_is_refused(config: ProxyConfig) -> None:
    inside = str(config.roots[0].here / "p1" / "run" / "docker.sock")
    with pytest.raises(Refused, match="engine socket"):
        check_source(str(config.roots[0].here / "p1"), config.roots, (inside,))


def test_sibling_mode_maps_host_paths_to_here_and_back(tmp_path: Path) -> None:
    here = tmp_path / "compiles"
    (here / "p1").mkdir(parents=True)
    (here / "alias").symlink_to("p1")
    (here / "abs").symlink_to(here / "p1")
    roots = (Root(PurePosixPath(here), PurePosixPath("/srv/site/compiles")),)
    assert check_source("/srv/site/compiles/alias", roots) == "/srv/site/compiles/p1"
    # An absolute link is followed here, and the engine is sent where it led: never the link.
    assert check_source("/srv/site/compiles/abs", roots) == "/srv/site/compiles/p1"
    with pytest.raises(Refused, match="not under"):
        check_source(str(here / "p1"), roots)  # the path as seen here means nothing to the host


def test_root_arguments_round_trip() -> None:
    assert Root.parse("/a=/b") == Root(PurePosixPath("/a"), PurePosixPath("/b"))
    assert Root.parse("/a").arg() == "/a"
    with pytest.raises(ValueError):
        Root.parse("a=/b")


def test_mounts_are_rebuilt_in_their_canonical_spelling(config: ProxyConfig) -> None:
    source = str(config.roots[0].here / "p1")
    mounts = [
        {
            "type": "bind",
            "source": source,
            "target": "/c",
            "readonly": True,
            "bindoptions": {"propagation": "rprivate"},
        }
    ]
    got = check(cli_run(Mounts=mounts), config).document["HostConfig"]["Mounts"]
    assert got == [
        {
            "Type": "bind",
            "Source": source,
            "Target": "/c",
            "ReadOnly": True,
            "BindOptions": {"Propagation": "rprivate"},
        }
    ]
    for bad in ({"CreateMountpoint": True}, {"Propagation": "rshared"}):
        mounts[0]["bindoptions"] = bad
        with pytest.raises(Refused):
            check(cli_run(Mounts=mounts), config)


def test_the_tests_run_where_links_resolve() -> None:
    assert os.path.realpath("/") == "/"
