"""The inference engine: worker process, streaming, precision, cancellation, crashes."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from napari_maeprobe.embed.engine import EngineConfig, InferenceEngine, WorkerCrashedError
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.preprocessing import cell_crops, normalize
from napari_maeprobe.progress import Cancelled

TINY = dict(random_init=True, model="default")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Real 96-px single-cell crops of the CellProfiler ExampleHuman field (3 channels)."""
    im, _ = load_sample("examplehuman")
    from napari_maeprobe.pp.segmentation import segment

    seg = segment(im, "builtin")
    return cell_crops(normalize(im.to_numpy()), seg.labels, 96).crops[:24]


def test_worker_streams_batches_in_order(crops):
    cfg = EngineConfig(**TINY, batch_size=10, precision="fp32", attention=True)
    seen = []
    with InferenceEngine(cfg) as eng:
        assert eng.info.device == "cpu" and eng.pid is not None
        results = list(eng.embed(crops, progress=lambda d, t, s: seen.append((d, t))))
    assert [r.index[0] for r in results] == [0, 10, 20]
    assert results[0].global_embedding.shape == (10, 144)
    assert results[0].channel_embeddings.shape == (10, 3, 144)
    assert results[0].patch_embeddings.shape == (10, 3, 8, 8, 144)
    assert results[0].attention.shape == (10, 4, 3, 8, 8)
    assert seen[0] == (0, 24) and seen[-1] == (24, 24)


def test_worker_matches_in_process_and_is_deterministic(crops):
    cfg = EngineConfig(**TINY, batch_size=8, precision="fp32")
    with InferenceEngine(cfg) as eng:
        a = np.concatenate([r.global_embedding for r in eng.embed(crops)])
    b = np.concatenate(
        [r.global_embedding for r in InferenceEngine(cfg, in_process=True).embed(crops)]
    )
    np.testing.assert_array_equal(a, b)


def test_bf16_close_to_fp32(crops):
    fp32 = InferenceEngine(EngineConfig(**TINY, precision="fp32"), in_process=True)
    bf16 = InferenceEngine(EngineConfig(**TINY, precision="bf16"), in_process=True)
    a = np.concatenate([r.global_embedding for r in fp32.embed(crops)])
    b = np.concatenate([r.global_embedding for r in bf16.embed(crops)])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999  # the stated tolerance (docs/models.md)


def test_masking_and_reconstruction_through_the_engine(crops):
    cfg = EngineConfig(**TINY, masking="random", reconstruction=True, seed=5)
    eng = InferenceEngine(cfg, in_process=True)
    (r,) = list(eng.embed(crops[:4]))
    assert r.mask.shape == (4, 3, 8, 8) and r.mask.reshape(4, -1).sum(1).tolist() == [144] * 4
    visible = ~np.repeat(np.repeat(r.mask, 12, axis=2), 12, axis=3)
    np.testing.assert_allclose(r.reconstruction[visible], crops[:4][visible], atol=1e-5)
    (again,) = list(InferenceEngine(cfg, in_process=True).embed(crops[:4]))
    np.testing.assert_array_equal(again.mask, r.mask)  # same seed, same mask
    cfg.batch_size = 1  # ... whatever the batching
    single = list(InferenceEngine(cfg, in_process=True).embed(crops[:4]))
    np.testing.assert_array_equal(np.concatenate([s.mask for s in single]), r.mask)


def test_cancel_stops_the_worker(crops):
    eng = InferenceEngine(EngineConfig(**TINY, batch_size=2))
    calls = []

    def progress(done, total, desc):
        calls.append(done)
        return done < 4  # cancel after two batches

    with pytest.raises(Cancelled):
        for _ in eng.embed(crops, progress=progress):
            pass
    assert eng.pid is None  # the worker was stopped


def test_killed_worker_gives_a_clear_error(crops):
    eng = InferenceEngine(EngineConfig(**TINY, batch_size=1))
    pid = eng.pid
    many = np.repeat(crops, 40, axis=0)
    threading.Timer(0.5, lambda: os.kill(pid, signal.SIGKILL)).start()
    t = time.monotonic()
    with pytest.raises(WorkerCrashedError, match="worker stopped while embedding.*killed"):
        for _ in eng.embed(many):
            pass
    assert time.monotonic() - t < 30  # no hang


def test_bad_model_and_channels(crops):
    with pytest.raises(MaeprobeInputError, match="no model named 'nope'"):
        InferenceEngine(EngineConfig(model="nope", random_init=True))
    eng = InferenceEngine(EngineConfig(**TINY))
    with pytest.raises(MaeprobeInputError, match=r"crop size \(64, 64\) is not a multiple"):
        list(eng.embed(np.zeros((2, 3, 64, 64), np.float32)))
    eng = InferenceEngine(EngineConfig(**TINY))
    with pytest.raises(MaeprobeInputError, match="1 to 11 channels"):
        list(eng.embed(np.zeros((2, 12, 96, 96), np.float32)))


def test_input_errors_are_not_swallowed_and_closed_engines_say_so(crops):
    def batches():
        yield crops[:3]
        raise FileNotFoundError("crop file vanished")

    eng = InferenceEngine(EngineConfig(**TINY))
    with pytest.raises(FileNotFoundError, match="vanished"):
        for _ in eng.embed(batches()):
            pass
    with pytest.raises(MaeprobeInputError, match="engine was closed"):
        list(eng.embed(crops[:2]))


def test_unusable_device_is_an_input_error():
    with pytest.raises(MaeprobeInputError, match="'cuda:7' was asked for but is not usable"):
        InferenceEngine(EngineConfig(**TINY, device="cuda:7"))
