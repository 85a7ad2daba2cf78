"""config.load and the .env files: every rule of the issue, on plain dicts and tmp files."""

from __future__ import annotations

from pathlib import Path

import pytest

from init import config
from init.config import Mode
from init.errors import ConfigError


def problems_of(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(environ)
    return caught.value.problems


def test_nothing_set_means_compiles_are_not_sandboxed() -> None:
    settings = config.load({})
    assert settings.mode is Mode.OFF
    assert settings.texlive_image == config.DEFAULT_TEXLIVE_IMAGE
    assert settings.all_texlive_images == (config.DEFAULT_TEXLIVE_IMAGE,)


@pytest.mark.parametrize("word", ["true", "TRUE", "True", "1", "yes", "YES", " yes "])
def test_true_words_turn_on_docker_in_docker(word: str) -> None:
    assert config.load({"SANDBOXED_COMPILES": word}).mode is Mode.DIND


@pytest.mark.parametrize("word", ["false", "FALSE", "0", "no", "No"])
def test_false_words_keep_sandboxing_off(word: str) -> None:
    assert config.load({"SANDBOXED_COMPILES": word}).mode is Mode.OFF


@pytest.mark.parametrize("word", ["maybe", "on", "off", "y", "2", ""])
def test_other_booleans_are_refused_naming_variable_value_and_fix(word: str) -> None:
    (problem,) = problems_of({"SANDBOXED_COMPILES": word})
    assert problem.startswith("SANDBOXED_COMPILES=")
    assert repr(word) in problem
    assert "use true or false" in problem


def test_sibling_mode() -> None:
    settings = config.load(
        {
            "SANDBOXED_COMPILES": "true",
            "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
            "SANDBOXED_COMPILES_HOST_DIR": "/data/sharelatex_data/data/compiles",
        }
    )
    assert settings.mode is Mode.SIBLING
    assert settings.host_dir_compiles == Path("/data/sharelatex_data/data/compiles")
    assert settings.warnings == ()


def test_sibling_without_sandboxed_compiles_is_an_error_with_the_fix() -> None:
    (problem,) = problems_of({"SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true"})
    assert "SANDBOXED_COMPILES_SIBLING_CONTAINERS=true" in problem
    assert "--env SANDBOXED_COMPILES=true" in problem


def test_host_dir_without_sibling_mode_is_only_a_warning() -> None:
    settings = config.load(
        {"SANDBOXED_COMPILES": "true", "SANDBOXED_COMPILES_HOST_DIR": "/data/compiles"}
    )
    assert settings.mode is Mode.DIND
    # Replaced, not ignored: the inner engine binds this container's own paths.
    (warning,) = settings.warnings
    assert warning.startswith("SANDBOXED_COMPILES_HOST_DIR=/data/compiles is replaced by ")
    assert str(settings.compiles_dir) in warning


def test_relative_host_dir_is_refused() -> None:
    (problem,) = problems_of(
        {
            "SANDBOXED_COMPILES": "true",
            "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
            "SANDBOXED_COMPILES_HOST_DIR": "data/compiles",
        }
    )
    assert "SANDBOXED_COMPILES_HOST_DIR='data/compiles'" in problem
    assert "absolute path" in problem


def test_split_host_dirs_win_over_the_single_one() -> None:
    settings = config.load(
        {
            "SANDBOXED_COMPILES": "true",
            "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
            "SANDBOXED_COMPILES_HOST_DIR": "/a/compiles",
            "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/b/compiles",
            "SANDBOXED_COMPILES_HOST_DIR_OUTPUT": "/b/output",
        }
    )
    assert settings.host_dir_compiles == Path("/b/compiles")
    assert settings.host_dir_output == Path("/b/output")
    assert any("disagree" in w for w in settings.warnings)


@pytest.mark.parametrize("prefix", ["OVERLEAF_", "SHARELATEX_"])
def test_prefixed_names_are_honoured(prefix: str) -> None:
    settings = config.load({prefix + "SANDBOXED_COMPILES": "true"})
    assert settings.mode is Mode.DIND


def test_unprefixed_name_wins_and_the_disagreement_is_reported() -> None:
    settings = config.load({"SANDBOXED_COMPILES": "false", "OVERLEAF_SANDBOXED_COMPILES": "true"})
    assert settings.mode is Mode.OFF
    (warning,) = settings.warnings
    assert "SANDBOXED_COMPILES='false'" in warning
    assert "OVERLEAF_SANDBOXED_COMPILES='true'" in warning
    assert "using SANDBOXED_COMPILES" in warning


def test_agreeing_prefixed_names_say_nothing() -> None:
    settings = config.load(
        {"TEX_LIVE_DOCKER_IMAGE": "a/b:1", "SHARELATEX_TEX_LIVE_DOCKER_IMAGE": "a/b:1"}
    )
    assert settings.warnings == ()


@pytest.mark.parametrize(
    "image",
    [
        "texlive/texlive:latest-full",
        "quay.io/sharelatex/texlive-full:2023.1",
        "localhost:5000/texlive:2022",
        "registry.example.com/a/b/c",
        "ubuntu",
        "sharelatex-init/texlive:bookworm",
        "texlive@sha256:" + "a" * 64,
    ],
)
def test_image_references_that_parse(image: str) -> None:
    assert config.is_valid_image_reference(image)


@pytest.mark.parametrize(
    "image", ["Texlive/Full", "texlive:", "texlive::1", "a b", "-texlive", "texlive:tag!", "/x"]
)
def test_image_references_that_do_not(image: str) -> None:
    assert not config.is_valid_image_reference(image)


def test_bad_image_is_refused_with_an_example() -> None:
    (problem,) = problems_of({"TEX_LIVE_DOCKER_IMAGE": "TeX Live"})
    assert "TEX_LIVE_DOCKER_IMAGE='TeX Live'" in problem
    assert "NAME[:TAG]" in problem


def test_image_list_orders_the_default_first_and_drops_duplicates() -> None:
    settings = config.load(
        {
            "TEX_LIVE_DOCKER_IMAGE": "tl:2023",
            "ALL_TEX_LIVE_DOCKER_IMAGES": "tl:2021, tl:2023,tl:2021,,tl:2022",
        }
    )
    assert settings.texlive_image == "tl:2023"
    assert settings.all_texlive_images == ("tl:2023", "tl:2021", "tl:2022")


def test_default_image_outside_the_allow_list_is_refused() -> None:
    (problem,) = problems_of(
        {"TEX_LIVE_DOCKER_IMAGE": "tl:2024", "ALL_TEX_LIVE_DOCKER_IMAGES": "tl:2021,tl:2022"}
    )
    assert "tl:2024 is not in ALL_TEX_LIVE_DOCKER_IMAGES" in problem


def test_list_alone_gives_the_default_image() -> None:
    settings = config.load({"ALL_TEX_LIVE_DOCKER_IMAGES": "tl:2021,tl:2022"})
    assert settings.texlive_image == "tl:2021"


def test_all_problems_are_reported_at_once() -> None:
    problems = problems_of(
        {
            "SANDBOXED_COMPILES": "sure",
            "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "perhaps",
            "TEX_LIVE_DOCKER_IMAGE": "bad image",
            "ALL_TEX_LIVE_DOCKER_IMAGES": "ok:1,Not Ok",
        }
    )
    assert len(problems) == 4
    assert all("\n" not in p for p in problems)


def test_service_environment_drops_only_the_sandbox_switches() -> None:
    env = {
        "SANDBOXED_COMPILES": "true",
        "OVERLEAF_SANDBOXED_COMPILES": "true",
        "SHARELATEX_SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
        "TEX_LIVE_DOCKER_IMAGE": "tl:1",
        "PATH": "/bin",
    }
    assert config.service_environment(env) == {"TEX_LIVE_DOCKER_IMAGE": "tl:1", "PATH": "/bin"}


def test_env_files_in_name_order_then_env_file_and_the_environment_wins(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "10-a.env").write_text("A=from-dir\nB=from-dir\nC=from-dir\n")
    (conf / "20-b.env").write_text('# a comment\nB=second\nexport D="quoted value"\n')
    (conf / "ignored.txt").write_text("C=never\n")
    extra = tmp_path / "extra.env"
    extra.write_text("C=from-flag\nE=${C}-expanded\n")
    values = config.read_env_files(conf, [extra])
    assert values == {
        "A": "from-dir",
        "B": "second",
        "C": "from-flag",
        "D": "quoted value",
        "E": "from-flag-expanded",
    }
    merged = config.merge_environment({"A": "from-env"}, values)
    assert merged["A"] == "from-env"
    assert merged["B"] == "second"


def test_a_line_dotenv_cannot_parse_is_an_error_not_a_silent_drop(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("GOOD=1\nthis is not an assignment\n")
    with pytest.raises(ConfigError) as caught:
        config.read_env_files(None, [bad])
    (problem,) = caught.value.problems
    assert f"{bad}:2" in problem
    assert "NAME=value" in problem


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.read_env_files(None, [tmp_path / "nope.env"])
    assert "cannot read it" in caught.value.problems[0]


def test_missing_config_dir_is_fine(tmp_path: Path) -> None:
    assert config.read_env_files(tmp_path / "absent") == {}


def test_storage_driver_opt_in() -> None:
    settings = config.load(
        {"SANDBOXED_COMPILES": "true", "SANDBOXED_COMPILES_STORAGE_DRIVER": "vfs"}
    )
    assert settings.storage_driver == "vfs"
    assert config.load({}).storage_driver is None


def test_unknown_storage_driver_is_refused_with_the_choices() -> None:
    (problem,) = problems_of({"SANDBOXED_COMPILES_STORAGE_DRIVER": "aufs"})
    assert "SANDBOXED_COMPILES_STORAGE_DRIVER='aufs'" in problem
    assert "overlay2" in problem and "vfs" in problem


def test_the_installer_sources_default_to_every_source_in_order() -> None:
    assert config.load({}).texlive_sources == ("pull", "load", "build")
    chosen = config.load({"OVERLEAF_INIT_TEXLIVE_SOURCES": " load, PULL,load"})
    assert chosen.texlive_sources == ("load", "pull")


def test_the_inits_own_variables_are_checked_all_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        config.load(
            {
                "OVERLEAF_INIT_TEXLIVE_SOURCES": "pull,ftp",
                "OVERLEAF_INIT_TEXLIVE_TARBALL_DIR": "images",
                "OVERLEAF_INIT_HTTP_ADDRESS": "8089",
                "OVERLEAF_INIT_COMPILE_RUNNER": "kubernetes",
            }
        )
    assert e.value.problems == [
        "OVERLEAF_INIT_TEXLIVE_SOURCES='pull,ftp': ftp is not a source; use a comma list of "
        "pull, load, build in the order to try, e.g. pull,load",
        "OVERLEAF_INIT_TEXLIVE_TARBALL_DIR='images' is not an absolute path; give a dir in "
        "the container, e.g. /var/lib/sharelatex-init/images",
        "OVERLEAF_INIT_HTTP_ADDRESS='8089': give HOST:PORT, e.g. 127.0.0.1:8089 or 0.0.0.0:8089",
        "OVERLEAF_INIT_COMPILE_RUNNER='kubernetes' is not a compile runner; use one of "
        "auto, shim, docker",
    ]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8089", ("127.0.0.1", 8089)),
        (":8089", ("0.0.0.0", 8089)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_http_addresses_that_parse(text: str, address: tuple[str, int]) -> None:
    assert config.parse_address(text) == address


@pytest.mark.parametrize("text", ["8089", "::1:80", "host:0", "host:65536", "host:http"])
def test_http_addresses_that_do_not(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_address(text)


def test_the_data_dirs_follow_the_images_generation(tmp_path: Path) -> None:
    """Overleaf 5+ keeps its data in /var/lib/overleaf, ShareLaTeX 4.x in /var/lib/sharelatex
    (and Overleaf 5's startup guard refuses an image where the latter exists at all)."""
    assert config.detect_generation(tmp_path) is config.Generation.OVERLEAF  # a plain base
    (tmp_path / "etc/sharelatex").mkdir(parents=True)
    assert config.detect_generation(tmp_path) is config.Generation.SHARELATEX
    four = config.load({}, root=tmp_path)
    assert four.compiles_dir == Path("/var/lib/sharelatex/data/compiles")
    assert four.output_dir == Path("/var/lib/sharelatex/data/output")
    (tmp_path / "etc/overleaf").mkdir()
    assert config.detect_generation(tmp_path) is config.Generation.OVERLEAF
    five = config.load({}, root=tmp_path)
    assert five.compiles_dir == Path("/var/lib/overleaf/data/compiles")
    given = config.load({config.COMPILES_DIR: "/srv/compiles"}, root=tmp_path)
    assert given.compiles_dir == Path("/srv/compiles")
    with pytest.raises(ConfigError) as caught:
        config.load({config.OUTPUT_DIR: "srv/output"}, root=tmp_path)
    assert caught.value.problems[0].startswith(f"{config.OUTPUT_DIR}='srv/output' is not an abs")


def test_the_inits_own_variables_are_consumed_under_both_spellings() -> None:
    environ = {
        config.COMPILE_MEMORY: "1g",
        config.OLD_OWN_PREFIX + "COMPILE_PIDS": "64",
        "SANDBOXED_COMPILES": "true",
        "SHARELATEX_SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
        "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/data/compiles",  # Server Pro's runner reads it
        "OVERLEAF_MONGO_URL": "mongodb://mongo/sharelatex",
        "COMPILE_TIMEOUT": "180",
    }
    assert config.service_environment(environ) == {
        "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/data/compiles",
        "OVERLEAF_MONGO_URL": "mongodb://mongo/sharelatex",
        "COMPILE_TIMEOUT": "180",
    }
