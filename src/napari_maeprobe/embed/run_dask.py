"""Run units on a dask.distributed cluster: one task per unit, one engine per worker, results
gathered into the store by the caller."""

from __future__ import annotations

import os

from napari_maeprobe.embed.engine import (
    EngineConfig,
    InferenceEngine,
    ModelInfo,
)
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.plan import PlannedImage
from napari_maeprobe.embed.store import UnitSpec
from napari_maeprobe.embed.units import embed_unit
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.pp.boundaries import boundary_map
from napari_maeprobe.progress import report

_WORKER_ENGINES: dict[str, InferenceEngine] = {}


def worker_engine(cfg: EngineConfig) -> InferenceEngine:
    """One in-process engine per dask worker and config (the model loads once per worker)."""
    key = repr(cfg)
    if key not in _WORKER_ENGINES:
        _WORKER_ENGINES.clear()
        threads = int(os.environ.get("MAEPROBE_WORKER_THREADS", "0")) or None
        if threads:
            cfg.threads = threads
        _WORKER_ENGINES[key] = InferenceEngine(cfg, in_process=True)
    return _WORKER_ENGINES[key]


def remote_model_info(scheduler: str, job: EmbedJob) -> ModelInfo:
    client = dask_client(scheduler)
    return client.submit(lambda cfg: worker_engine(cfg).info, job.engine_config(),
                         pure=False).result()  # fmt: skip


def remote_unit(p: PlannedImage, unit: UnitSpec, job: EmbedJob, crop_size) -> dict:
    """A dask task: embed one unit on a worker and return its obs, extras and full arrays."""
    engine = worker_engine(job.engine_config())
    boundary = boundary_map(p.labels) if p.labels is not None else None
    out: dict = {"arrays": {}}
    for kind, *payload in embed_unit(p, unit, engine, job, crop_size, boundary):
        if kind == "begin":
            out["obs"], out["extras"] = payload
            continue
        for name, start, values in payload[0]:
            out["arrays"].setdefault(name, []).append((start, values))
    out["dim"] = engine.info.embed_dim
    return out


_CLIENTS: dict[str, object] = {}


def dask_client(scheduler: str):
    """A dask.distributed client for an address, or a LocalCluster for ``"local"``."""
    from distributed import Client, LocalCluster

    if scheduler not in _CLIENTS:
        if scheduler == "local":
            n = max(1, min(2, os.cpu_count() or 1))
            threads = max(
                1, (os.cpu_count() or 1) // n
            )  # torch threads per worker: no oversubscription
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=None,
                                   env={"MAEPROBE_WORKER_THREADS": str(threads)})  # fmt: skip
            _CLIENTS[scheduler] = Client(cluster)
        else:
            try:
                _CLIENTS[scheduler] = Client(scheduler, timeout=30)
            except OSError as exc:
                raise MaeprobeInputError(
                    f"cannot reach the dask scheduler at {scheduler} ({exc})",
                    "start it (dask scheduler, or dask-jobqueue on SLURM) and pass its address",
                ) from exc
    return _CLIENTS[scheduler]


def close_clients() -> None:
    """Close the dask clients (and local clusters) this process opened."""
    while _CLIENTS:
        _, client = _CLIENTS.popitem()
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()


def run_distributed(store, planned, todo, job, crop_size, scheduler, progress, done, total):
    from distributed import as_completed

    client = dask_client(scheduler)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    scattered: dict[int, object] = {}
    pending = list(todo)
    futures = as_completed()
    by_key = {}

    def submit_next() -> None:
        unit = pending.pop(0)
        i = unit.image_index
        if i not in scattered:
            scattered[i] = client.scatter(planned[i], broadcast=False)
        fut = client.submit(remote_unit, scattered[i], unit, job, crop_size,
                            key=f"maeprobe-unit-{unit.key}-{id(store)}", pure=False)  # fmt: skip
        by_key[fut.key] = unit
        futures.add(fut)

    for _ in range(min(len(pending), 2 * n_workers)):  # bounded in flight: bounded memory
        submit_next()
    try:
        for fut in futures:
            unit = by_key.pop(fut.key)
            res = fut.result()
            store.begin_unit(unit, res["obs"], res["dim"], job.dtype, res["extras"])
            for name, parts in res["arrays"].items():
                for start, values in parts:
                    store.write_rows(unit.key, name, start, values)
            store.finish_unit(unit.key)
            done += len(unit.cell_ids)
            report(progress, done, total, "embedding")
            if pending:
                submit_next()
    except BaseException:
        for fut in list(futures.futures):
            fut.cancel()
        raise
