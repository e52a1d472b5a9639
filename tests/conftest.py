"""Shared fixtures: offline environment, the tiny model, and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)


def share_cores_between_workers() -> None:
    """Under pytest-xdist (`-n N`, scripts/test.sh), give each worker's torch, and the CLI runs it starts, an equal
    share of the cores: N workers each running torch's default one thread per core would contend for the same cores
    (OpenMP threads spin while they wait), slower than the serial suite. Set before anything imports torch, which
    reads OMP_NUM_THREADS once; a value already in the environment is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


share_cores_between_workers()

DEMO_TRAIN = str(REPO / "data" / "demo" / "train.jsonl")
DEMO_EVAL = str(REPO / "data" / "demo" / "eval.jsonl")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache_dir holding tiny-llama/ (ChatML), the folder config/model/tiny.yaml points at."""
    import make_tiny_model

    cache = tmp_path_factory.mktemp("cache")
    make_tiny_model.make(cache / "tiny-llama", "chatml")
    return cache


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory) -> dict:
    """Tokenizers in three chat template styles: ChatML, Llama 3 and [INST]."""
    import make_tiny_model

    return {style: make_tiny_model.build_tokenizer(style) for style in make_tiny_model.TEMPLATES}


def run_cli(
    args: list[str], launcher: list[str] | None = None, timeout: int = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run `python launch.py ARGS` (or `LAUNCHER launch.py ARGS`) from `cwd` (the repo root); never raises."""
    command = (launcher or [sys.executable]) + [str(REPO / "launch.py"), *args]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def shared_fixture_groups(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """Each test that uses a module- or class-scoped fixture, with a group name: tests linked through such fixtures
    (A and B share one, B and C another) get the same name. Tests that share none are left out."""
    parent: dict[str, str] = {}  # "file::fixture" -> another of its group (union-find)

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)  # absent on items that are not test functions
        fixtures = info.name2fixturedefs.items() if info else ()
        file = item.nodeid.split("::")[0]
        keys = [f"{file}::{name}" for name, defs in fixtures if defs and defs[-1].scope in ("module", "class")]
        for key in keys:
            parent.setdefault(key, key)
            parent[root(key)] = root(keys[0])
        if keys:
            shared[item] = keys[0]
    return {item: root(key) for item, key in shared.items()}


# pytest-xdist (`-n 2 --dist loadgroup`, scripts/test.sh). xdist's own loadgroup reads `xdist_group` marks into the
# node ids, which pytest 9 no longer lets it change: the marks are silently ignored. So the workers, which collect,
# write each test's group to a file the controller names, and the controller's scheduler reads it.
GROUPS_FILE = "halyard_groups_file"  # the workerinput key


def groups_file() -> Path:
    """Where the workers write the groups, named by the controller's process id."""
    return Path(tempfile.gettempdir()) / f"halyard-test-groups-{os.getpid()}.json"


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller, once per worker it starts
def pytest_configure_node(node) -> None:
    node.workerinput[GROUPS_FILE] = str(groups_file())


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own scheduler
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With `--dist loadgroup`: the tests that share a module-scoped fixture (mostly a whole CLI run) go to one
    worker, which builds it once; every other test is scheduled on its own, so the workers stay evenly loaded. xdist
    hands out the groups first, largest first, then single tests in collection order."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first called once every worker has collected, and so written the file
                path = groups_file()
                self.groups = json.loads(path.read_text()) if path.exists() else {}
                path.unlink(missing_ok=True)
            return self.groups.get(nodeid, nodeid)

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: write each test's group for the controller's scheduler, and put the slow CLI runs before
    the unit tests, so the last tests handed out are short ones and no worker sits idle while another finishes a
    minutes-long run (a stable sort, the same on every worker, as xdist requires). Without xdist: nothing."""
    path = getattr(config, "workerinput", {}).get(GROUPS_FILE)
    if not path:
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    groups = {item.nodeid: group for item, group in shared_fixture_groups(items).items()}
    partial = Path(f"{path}.{os.environ.get('PYTEST_XDIST_WORKER', 'worker')}")
    partial.write_text(json.dumps(groups))
    partial.replace(path)  # every worker writes the same groups; the file appears whole
