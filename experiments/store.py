"""Opening a store (MLflow's tracking store, Optuna's storage) that several processes may be the first to create.

A ``sqlite:///`` file that does not exist yet is created by whichever process opens it first, and both MLflow and
Optuna then run their schema migrations in it. Started together (a shell loop, a job array, parallel sweeps), the
processes race: all but one fail with "table ... already exists" and their runs are recorded nowhere. Neither
library guards this, so the first opening (and the creation of the experiment) happens under an advisory file lock
beside the database; once a process has opened the store its client is cached, and the lock is not taken again.
Servers (``postgresql://``, ``http://``) serialise this themselves: no lock is taken for them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Run

SQLITE = "sqlite:///"
# user:password@ in any URL, and password-like query parameters (?password=..., &token=...)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<user>[^/@:\s'\"]*):(?P<secret>[^/@\s'\"]+)@")
_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|secret|api_key|access_key)=)[^&\s'\"]+", re.IGNORECASE)
MASK = "***"


def mask_secrets(text: str) -> str:
    """``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``: what is safe to record or print."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


LOCK_TIMEOUT_S = 600  # a migration on a slow disk takes seconds; this only bounds a lock left by a hung process


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and for in-memory databases)."""
    if not uri.startswith(SQLITE):
        return None
    path = uri[len(SQLITE) :].split("?", 1)[0]
    return None if not path or path == ":memory:" else Path(path)


@contextlib.contextmanager
def first_opening(uri: str) -> Iterator[None]:
    """Hold the store's creation lock (a no-op for anything but a sqlite file)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
        yield


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its runs' artifacts: beside the database, in
    ``<its folder>/mlruns/<name>``; None for other stores (a server has its own artifact root, a file store keeps
    them inside itself).

    Why: for a database store MLflow puts them in ``./mlruns`` of whatever directory the experiment happened to be
    created from, so the runs of ``sqlite:////data/mlflow.db`` left their files wherever the first run started (and
    tests, on a temporary store, left theirs in the repository). For the default ``sqlite:///mlflow.db`` this is
    the same folder as before."""
    path = sqlite_path(uri)
    if path is None:
        return None
    folder = re.sub(r"[^\w.-]+", "_", name).strip("._") or "experiment"
    return (path.resolve().parent / "mlruns" / folder).as_uri()


def open_experiment(uri: str, name: str) -> tuple[mlflow.MlflowClient, str]:
    """A client of the tracking store at ``uri`` and the id of experiment ``name``, both created if missing (its
    artifacts beside a sqlite database: :func:`artifact_location`), safely when many processes start at once."""
    with first_opening(uri):
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return client, client.create_experiment(name, artifact_location=artifact_location(uri, name))
    return client, experiment.experiment_id


PAGE = 1000  # runs per search page (MLflow's default page; its cap is 50,000)


def search_all_runs(client: mlflow.MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every run matching ``filter_string``, following MLflow's pages: one ``search_runs`` call returns at most a
    page, so a sweep of more trials than that would be counted (and merged) short without this."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
