"""The inference engine: runs a registered model over batches of crops in a worker process.

- Device ``auto`` picks CUDA, then MPS, then the CPU; precision ``auto`` picks bfloat16 on CUDA
  (float16 on GPUs without it) and on CPUs with native bfloat16 (oneDNN), float32 otherwise.
  Reduced precision converts the weights (16% faster than autocast on ViT-B/16 here, which
  re-casts them every batch); attention softmax and the pooled outputs stay in float32.
- Batches are sized inside the worker (``batch_size=None``: from free memory on a GPU) and
  halved on out-of-memory.
- Attention maps use the explicit softmax path only when asked for; embeddings use fused
  attention.
- The model lives in a separate process (a fresh interpreter), so a crash or an out-of-memory
  kill in the model cannot take down napari or the caller: it comes back as
  :class:`WorkerCrashedError`, one sentence.
- Errors inside the worker: bad input (:class:`~napari_maeprobe.errors.MaeprobeInputError` and
  its subclasses, by ``isinstance``) is raised again in the caller as the same type with its
  problem and fix; anything else (a plain ``ValueError`` from torch, a bug) becomes a
  :class:`WorkerCrashedError` that says it is a bug, with the worker's traceback as its cause
  (``maeprobe --debug`` prints it) and in ``worker_traceback``.
- A worker whose caller is gone (killed, or Ctrl-C) exits quietly with a nonzero status: it
  notices the closed pipe or the parent's death, and SIGINT ends it at once, without tracebacks.
- Results stream out batch by batch (:class:`BatchResult`), with progress callbacks and
  cancellation (the callback returns ``False``, or :meth:`InferenceEngine.cancel` from any
  thread; ``on_started`` / ``started`` say from when the worker process exists).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import Cancelled, CancelToken, ProgressCallback, report

LEVELS = ("global", "channel", "patch")

#: the worker's exit status after reporting an error, when its caller is gone (closed pipe or
#: dead parent), and after SIGINT (Ctrl-C in the terminal reaches the whole process group)
EXIT_ERROR, EXIT_PARENT_GONE, EXIT_INTERRUPTED = 1, 3, 130


class WorkerCrashedError(RuntimeError):
    """The model's worker process died (killed, out of memory, or a crash in native code), or
    failed with an error that is not bad input (a bug): ``worker_traceback`` then holds the
    worker's traceback (also chained as the cause, which ``maeprobe --debug`` prints)."""

    worker_traceback: str | None = None


class WorkerTraceback(Exception):
    """The traceback of an error in the worker process, chained as the cause of the caller's."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


@dataclass
class EngineConfig:
    """What to run and how: the model, its weights and the execution settings."""

    model: str = "default"
    weights: str | None = None
    model_options: dict = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int | None = None
    levels: tuple[str, ...] = LEVELS
    attention: bool = False
    reconstruction: bool = False
    masking: str = "none"  # none | random | boundary
    mask_ratio: float = 0.75
    tau: float = 0.5
    seed: int = 0
    random_init: bool = False
    threads: int | None = None
    compile: bool = False  # torch.compile with frozen weights: ~15% faster after ~30 s of compiling
    imports: tuple[str, ...] = ()  # modules that register extra models (imported in the worker)


@dataclass
class BatchResult:
    """The model's outputs for one batch, as NumPy arrays (float32 unless stated)."""

    index: np.ndarray
    global_embedding: np.ndarray | None
    channel_embeddings: np.ndarray | None
    patch_embeddings: np.ndarray | None
    attention: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclass
class ModelInfo:
    """Facts about the loaded model, for the metadata of every result."""

    name: str
    weights_name: str
    weights_sha256: str
    embed_dim: int
    patch_size: tuple[int, ...]
    channel_agnostic: bool
    device: str
    precision: str
    input_size: tuple[int, ...] = ()  # the crop size the model was built for ([Z,] Y, X)
    n_channels: int | None = None  # the channel count the model takes (None: any number)
    standardizes_crops: bool = False  # the model z-scores each crop channel itself


def model_input_size(model) -> tuple[int, ...]:
    """The crop size a model was built for: ``input_size``, ``img_size`` or 224 (DINOv2)."""
    if getattr(model, "input_size", None):
        return tuple(int(s) for s in model.input_size)
    size = getattr(model, "img_size", None) or 224
    return (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)


def resolve_device(choice: str = "auto") -> str:
    """``auto`` -> cuda, then mps, then cpu; otherwise the choice, checked."""
    import torch

    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(choice)
    except RuntimeError as exc:
        raise MaeprobeInputError(
            f"unknown device {choice!r}", "use auto, cpu, cuda or mps"
        ) from exc
    usable = {
        "cpu": True,
        "cuda": torch.cuda.is_available()
        and (dev.index is None or dev.index < torch.cuda.device_count()),
        "mps": torch.backends.mps.is_available(),
    }.get(dev.type, False)
    if not usable:
        raise MaeprobeInputError(
            f"device {choice!r} was asked for but is not usable on this machine",
            "use --device auto (or cpu)",
        )
    return choice


def resolve_precision(choice: str, device: str) -> str:
    """``auto`` -> bf16 where the hardware runs it natively, else fp32."""
    import torch

    if choice != "auto":
        if choice not in ("fp32", "bf16", "fp16"):
            raise MaeprobeInputError(
                f"unknown precision {choice!r}", "use auto, fp32, bf16 or fp16"
            )
        return choice
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        except (AttributeError, RuntimeError):
            return "fp32"
    return "fp32"


def default_batch_size(model, sample_shape: tuple[int, ...], device: str) -> int:
    """A batch that fits. GPU: from free memory (activations of the widest layer, x 16 for the
    blocks' intermediates). CPU: the MLP activations of a batch kept near 16 MB, so they stay in
    cache (ViT-B/16 on this machine: 9.9 images/s at batch 8, 9.3 at 16, 7.5 at 64)."""
    import torch

    grid = model.token_grid(sample_shape)
    tokens = int(np.prod(grid)) + 1
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        per_sample = tokens * model.embed_dim * 4 * 16 + tokens * tokens * 4 * 2
        return int(max(1, min(1024, 0.5 * free / per_sample)))
    mlp_bytes = tokens * model.embed_dim * 4 * 2  # bf16 MLP hidden activations per crop
    return int(max(1, min(64, (16 * 2**20) // max(mlp_bytes, 1))))


class _Runner:
    """Runs the model on batches inside the worker (or in-process for tests and debugging)."""

    def __init__(self, cfg: EngineConfig) -> None:
        import torch

        from napari_maeprobe.models.registry import create_model

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        import importlib

        for module in cfg.imports:  # the worker is a fresh interpreter: register extra models
            importlib.import_module(module)
        self.cfg = cfg
        self._sizes: dict[tuple, int] = {}
        self._checked: set[tuple[int, ...]] = set()
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model = (
            create_model(
                cfg.model, weights=cfg.weights, random_init=cfg.random_init, **cfg.model_options
            )
            .to(self.device)
            .eval()
        )
        if cfg.reconstruction and not self.model.has_decoder:
            raise MaeprobeInputError(
                f"model {cfg.model!r} has no decoder",
                "ask for reconstructions from a model with a decoder",
            )
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is not None:
            self.model = self.model.to(dtype)
        self.forward = self.model
        if cfg.compile:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold the weights (oneDNN prepacking)
            self.forward = torch.compile(self.model)
        m = self.model
        self.info = ModelInfo(
            cfg.model,
            getattr(m, "weights_name", ""),
            getattr(m, "weights_sha256", ""),
            int(m.embed_dim),
            tuple(m.patch_size),
            bool(m.channel_agnostic),
            self.device,
            self.precision,
            model_input_size(m),
            None if getattr(m, "in_chans", None) is None else int(m.in_chans),
            bool(getattr(m, "standardizes_crops", False)),
        )

    def batch_size(self, shape: tuple[int, ...], n: int) -> int:
        """The batch for crops of ``shape``: the configured one, or what fits (remembered)."""
        if self.cfg.batch_size:
            return self.cfg.batch_size
        key = tuple(shape)
        if key not in self._sizes:
            self._sizes[key] = default_batch_size(self.model, key, self.device)
        return min(self._sizes[key], max(n, 1))

    def check_crops(self, shape: tuple[int, ...]) -> None:
        """Refuse crops the model cannot take (dimensions, size, channel count) as bad input.

        The models' own shape checks raise plain ``ValueError``; here, before the forward pass,
        they are the input's fault. A ``ValueError`` during the forward pass is not: it comes
        back as a bug (:class:`WorkerCrashedError`)."""
        shape = tuple(int(s) for s in shape)
        if shape in self._checked:
            return
        import torch

        try:
            self.model.token_grid(shape)
            check = getattr(self.model, "_check", None)  # the model's input check, if it has one
            if callable(check):
                check(torch.empty((1, *shape), device="meta"))
        except MaeprobeInputError:
            raise
        except ValueError as exc:
            raise MaeprobeInputError(
                f"{self.cfg.model}: {exc}",
                "give crops of the model's input size and channel range (maeprobe models)",
            ) from exc
        self._checked.add(shape)

    def shrink_batch(self, shape: tuple[int, ...], size: int) -> int:
        """Halve (and remember) the batch for ``shape`` after an out-of-memory error."""
        self._sizes[tuple(shape)] = max(1, size // 2)
        self.cfg.batch_size = None
        return self._sizes[tuple(shape)]

    def run(self, index: np.ndarray, crops: np.ndarray, boundary: np.ndarray | None) -> BatchResult:
        import torch

        from napari_maeprobe.pp.masking import make_mask

        cfg = self.cfg
        x = torch.from_numpy(np.ascontiguousarray(crops))
        if x.dtype in (torch.uint8, torch.int16, torch.int32, torch.uint16):
            x = x.to(self.device, non_blocking=True).float() / float(np.iinfo(crops.dtype).max)
        else:
            x = x.to(self.device, non_blocking=True).float()
        grid = self.model.token_grid(tuple(x.shape[1:]))
        mask = None
        if cfg.masking != "none":  # one seed per crop: a crop's mask does not depend on batching
            mask = torch.stack(
                [
                    make_mask(
                        cfg.masking,
                        grid,
                        1,
                        cfg.mask_ratio,
                        cfg.tau,
                        None if boundary is None else boundary[i : i + 1],
                        seed=cfg.seed * 1_000_003 + int(crop),
                    )[0]
                    for i, crop in enumerate(index)
                ]
            )
        with torch.inference_mode():
            out = self.forward(
                x,
                None if mask is None else mask.to(self.device),
                attention=cfg.attention,
                reconstruction=cfg.reconstruction,
            )

        def np_(t):
            return None if t is None else t.detach().float().cpu().numpy()

        return BatchResult(
            index=index,
            global_embedding=np_(out.global_embedding) if "global" in cfg.levels else None,
            channel_embeddings=np_(out.channel_embeddings) if "channel" in cfg.levels else None,
            patch_embeddings=np_(out.patch_embeddings) if "patch" in cfg.levels else None,
            attention=np_(out.attention),
            reconstruction=np_(out.reconstruction),
            mask=None if out.mask is None else out.mask.cpu().numpy(),
        )


def worker_main(read_fd: int, write_fd: int, parent_pid: int | None = None) -> int:
    """Worker process: read the config, build the model, then answer batches until told to stop.

    Started as ``python -m napari_maeprobe.embed._worker READ_FD WRITE_FD PARENT_PID``: a fresh
    interpreter, so the caller's script is not re-imported (as multiprocessing's spawn would).
    Returns the exit status: 0 when told to stop, :data:`EXIT_ERROR` after reporting an error.
    When the caller is gone (a closed pipe, or ``parent_pid`` no longer its parent) it exits at
    once with :data:`EXIT_PARENT_GONE`, writing nothing.
    """
    from multiprocessing.connection import Connection

    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    if parent_pid:
        _watch_parent(parent_pid)

    def send(message) -> None:
        try:
            outbox.send(message)
        except (OSError, EOFError):  # nobody reads any more: the caller is gone
            _exit_quietly(EXIT_PARENT_GONE)

    def receive():
        try:
            return inbox.recv()
        except (OSError, EOFError):
            _exit_quietly(EXIT_PARENT_GONE)

    try:
        runner = _Runner(receive())
    except Exception as exc:  # report, then exit
        send(("error", _describe(exc)))
        return EXIT_ERROR
    send(("ready", runner.info))
    while True:
        msg = receive()
        if msg is None:
            return 0
        try:
            index, crops, boundary = msg
            results = _run_with_oom_retry(runner, index, crops, boundary)
        except Exception as exc:
            send(("error", _describe(exc)))
            return EXIT_ERROR
        send(("batch", results))


def _exit_quietly(status: int) -> None:
    """End the worker now, without tracebacks or exit handlers (its caller is gone)."""
    os._exit(status)


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exit quietly once the caller has died, even in the middle of a long batch."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                _exit_quietly(EXIT_PARENT_GONE)

    threading.Thread(target=watch, daemon=True, name="maeprobe-parent-watch").start()


def _run_with_oom_retry(runner: _Runner, index, crops, boundary) -> list[BatchResult]:
    """Run crops in batches the device holds; on GPU out-of-memory, halve the batch and retry
    (outside the ``except``, so the failed batch's tensors are freed first)."""
    import torch

    runner.check_crops(crops.shape[1:])
    size = runner.batch_size(crops.shape[1:], len(index))
    out: list[BatchResult] = []
    start = 0
    while start < len(index):
        stop = min(start + size, len(index))
        b = None if boundary is None else boundary[start:stop]
        oom = False
        try:
            out.append(runner.run(index[start:stop], crops[start:stop], b))
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            oom = True
        if oom:
            torch.cuda.empty_cache()
            size = runner.shrink_batch(crops.shape[1:], size)
            continue
        start = stop
    return out


def _describe(exc: BaseException) -> dict:
    """What the caller needs to raise the right error for an exception of the worker.

    ``kind``: ``"input"`` for bad input (``isinstance`` of
    :class:`~napari_maeprobe.errors.MaeprobeInputError`: its problem and fix travel), ``"memory"``
    for out-of-memory, ``"bug"`` for anything else; plus the type, message and traceback.
    """
    torch = sys.modules.get("torch")
    oom = isinstance(exc, MemoryError) or (
        torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ()))
    )
    kind = "input" if isinstance(exc, MaeprobeInputError) else "memory" if oom else "bug"
    cls = type(exc)
    return {
        "kind": kind,
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "message": str(exc),
        "problem": getattr(exc, "problem", None) if kind == "input" else None,
        "fix": getattr(exc, "fix", None) if kind == "input" else None,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _input_error(payload: dict) -> MaeprobeInputError:
    """The worker's bad-input error as the same product type (problem and fix kept)."""
    import importlib

    problem, fix = payload["problem"] or payload["message"], payload["fix"]
    try:
        cls = importlib.import_module(payload["module"])
        for part in payload["qualname"].split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, MaeprobeInputError):
            return cls(problem, fix)
    except Exception:  # a type the caller cannot rebuild: the base type says the same
        pass
    return MaeprobeInputError(problem, fix)


def _worker_error(payload: dict, doing: str) -> Exception:
    """The caller's exception for an error the worker reported (see :func:`_describe`)."""
    tb = payload.get("traceback") or ""
    if payload["kind"] == "input":
        exc: Exception = _input_error(payload)
    elif payload["kind"] == "memory":
        exc = WorkerCrashedError(
            f"the inference worker ran out of memory while {doing}. Fix: use a smaller "
            "--batch-size, or --device cpu"
        )
    else:
        message = (payload["message"].strip().splitlines() or [""])[0][:300]
        name = payload["qualname"]
        exc = WorkerCrashedError(
            f"{doing} failed in the inference worker with {name}"
            f"{': ' + message if message else ''}. This is a bug in maeprobe or the model, not "
            "a problem with your data; maeprobe --debug shows the worker's traceback"
        )
    exc.worker_traceback = tb
    exc.__cause__ = WorkerTraceback(tb)
    return exc


class InferenceEngine:
    """Embeds batches of crops with one model, in a worker process (or in-process).

    Use as a context manager; :meth:`embed` yields :class:`BatchResult` per batch.

    ``on_started(engine)`` is called (from the constructing thread) as soon as the worker
    process exists, before the model is loaded; ``started`` is set then too. From that moment
    :meth:`cancel`, from any thread, stops the engine within a fraction of a second: the thread
    starting it or in :meth:`embed` raises :class:`~napari_maeprobe.progress.Cancelled`.
    """

    def __init__(
        self,
        config: EngineConfig,
        in_process: bool = False,
        start_timeout: float = 600.0,
        on_started=None,
    ) -> None:
        self.config = config
        self.in_process = in_process
        self._runner: _Runner | None = None
        self._proc = None
        self._closed = False
        self._lock = threading.Lock()  # guards _proc between close() and cancel()
        self.token = CancelToken()
        self.started = threading.Event()
        if in_process:
            self._set_started(on_started)
            self._runner = _Runner(config)
            self.info = self._runner.info
            return
        import subprocess
        from multiprocessing.connection import Connection

        r1, w1 = os.pipe()  # to the worker
        r2, w2 = os.pipe()  # from the worker
        with self._lock:
            if self.token.cancelled:
                for fd in (r1, w1, r2, w2):
                    os.close(fd)
                raise Cancelled("cancelled before the model started")
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "napari_maeprobe.embed._worker", str(r1), str(w2),
                 str(os.getpid())],
                pass_fds=(r1, w2),
            )  # fmt: skip
        os.close(r1)
        os.close(w2)
        self._to_worker = Connection(w1, readable=False)
        self._from_worker = Connection(r2, writable=False)
        try:
            self._set_started(on_started)
            self._send(config)
            _, self.info = self._receive("starting the model", timeout=start_timeout)
        except BaseException:  # Cancelled, Ctrl-C, a crash: no worker left behind
            self.close(kill=True)
            raise

    def _set_started(self, on_started) -> None:
        self.started.set()
        if on_started is not None:
            on_started(self)

    def cancel(self) -> None:
        """Stop now; safe to call from any thread, any number of times, before or after start.

        Kills the worker process (it holds no results that are not yet sent); the thread in
        :meth:`embed` or in the constructor raises :class:`Cancelled` and closes the engine.
        In-process engines stop after the current batch.
        """
        self.token.cancel()
        with self._lock:
            if self._proc is not None:
                try:
                    self._proc.kill()
                except OSError:
                    pass

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    # -- worker plumbing ---------------------------------------------------------------------
    def _alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def _crashed(self, doing: str) -> Exception:
        """The error for a worker that stopped: :class:`Cancelled` after :meth:`cancel`, else a
        :class:`WorkerCrashedError` in one sentence. Closes the engine."""
        proc, code = self._proc, None
        if proc is not None and not self.token.cancelled:
            try:
                code = proc.wait(timeout=5)
            except Exception:
                code = proc.poll()
        self.close(kill=True)
        if self.token.cancelled:
            return Cancelled(f"cancelled while {doing}")
        if code is not None and code < 0:
            try:
                import signal

                why = f"killed by {signal.Signals(-code).name}: out of memory?"
            except ValueError:
                why = "killed: out of memory?"
        elif code == EXIT_INTERRUPTED:
            why = "interrupted"
        else:
            why = f"exit code {code}"
        return WorkerCrashedError(
            f"the inference worker stopped while {doing} ({why}). Fix: use a smaller "
            "--batch-size, or --device cpu; the store keeps every finished unit, so the same "
            "command resumes"
        )

    def _send(self, item) -> None:
        try:
            self._to_worker.send(item)
        except (BrokenPipeError, OSError, EOFError):
            raise self._crashed("receiving a batch") from None

    def _receive(self, doing: str, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.token.cancelled:
                raise self._crashed(doing)
            try:
                ready = self._from_worker.poll(0.2)
            except (OSError, EOFError):
                ready = False
            if not ready:
                if not self._alive():
                    raise self._crashed(doing)
                if deadline is not None and time.monotonic() > deadline:
                    self.close(kill=True)
                    raise WorkerCrashedError(f"the inference worker did not answer while {doing}")
                continue
            try:
                kind, payload = self._from_worker.recv()
            except (EOFError, OSError):
                raise self._crashed(doing) from None
            if kind == "error":
                self.close(kill=True)
                raise _worker_error(payload, doing)
            return kind, payload

    def embed(
        self,
        crops: np.ndarray | Iterable[np.ndarray],
        boundary: np.ndarray | None = None,
        total: int | None = None,
        progress: ProgressCallback | None = None,
        first_index: int = 0,
    ) -> Iterator[BatchResult]:
        """Embed ``crops`` (an array (N, C, [Z,] Y, X) or an iterable of such batches).

        ``boundary``: per-patch boundary fractions (N, *spatial grid) for boundary-guided masking.
        ``first_index``: the index of the first crop in a larger job; masks are seeded per crop
        index, so a job split into pieces gets the same masks as in one piece.
        Yields results batch by batch, in input order (``index`` counts from ``first_index``).
        """
        self.token.check("embedding")
        if self._closed:
            raise MaeprobeInputError(
                "this inference engine was closed (cancelled, or its worker stopped)",
                "create a new InferenceEngine",
            )
        batches = self._batches(crops, boundary, first_index)
        n_total = (
            total if total is not None else (len(crops) if isinstance(crops, np.ndarray) else 0)
        )
        done = 0
        report(progress, 0, n_total, "embedding")
        if self._runner is not None:
            for index, x, b in batches:
                self.token.check("embedding")
                for res in _run_with_oom_retry(self._runner, index, x, b):
                    done += len(res.index)
                    yield res
                report(progress, done, max(n_total, done), "embedding")
            return
        from multiprocessing.reduction import ForkingPickler

        sent: queue.Queue = queue.Queue()
        failure: list[BaseException] = []  # an error reading or packing the input
        stop = threading.Event()

        def sender() -> None:  # sends while the main thread receives: no pipe deadlock
            try:
                for item in batches:
                    if stop.is_set() or self.token.cancelled:
                        return
                    # protocol 5 pickles arrays ~5x faster: shorter GIL holds (GUI stays smooth)
                    payload = bytes(ForkingPickler.dumps(item, protocol=5))
                    sent.put(len(item[0]))
                    try:
                        self._to_worker.send_bytes(payload)
                    except (BrokenPipeError, OSError):
                        return  # the worker died: the receiving side reports it
            except BaseException as exc:
                failure.append(exc)
            finally:
                sent.put(None)

        thread = threading.Thread(target=sender, daemon=True, name="maeprobe-sender")
        thread.start()
        try:
            while True:
                try:  # while the sender reads the next crops, a cancel still stops at once
                    n = sent.get(timeout=0.05)
                except queue.Empty:
                    self.token.check("embedding")
                    continue
                if n is None:
                    break
                for res in self._receive(f"embedding crops {done} to {done + n - 1}")[1]:
                    done += len(res.index)
                    yield res
                report(progress, done, max(n_total, done), "embedding")
            if failure:
                raise failure[0]
        except BaseException:
            stop.set()
            self.close(kill=True)
            raise

    def _batches(self, crops, boundary, first_index: int = 0):
        if isinstance(crops, np.ndarray):
            if crops.ndim < 4:
                raise MaeprobeInputError(
                    f"crops have shape {crops.shape}", "pass (N, C, [Z,] Y, X) crops"
                )
            bs = self.config.batch_size or self._auto_batch(crops.shape[1:])
            for i in range(0, len(crops), bs):
                idx = np.arange(i, min(i + bs, len(crops))) + first_index
                yield idx, crops[i : i + bs], None if boundary is None else boundary[i : i + bs]
        else:
            start = first_index
            for batch in crops:
                b = None
                if isinstance(batch, tuple):
                    batch, b = batch
                idx = np.arange(start, start + len(batch))
                start += len(batch)
                yield idx, batch, b

    def batch_size_for(self, shape: tuple[int, ...]) -> int:
        """The batch the engine uses for crops of ``shape`` (C, [Z,] Y, X)."""
        return self.config.batch_size or self._auto_batch(tuple(shape))

    def _auto_batch(self, shape) -> int:
        """Crops sent at a time. The runner splits them into batches that fit its device (sized
        from free GPU memory, halved on out-of-memory), so this only bounds what is in flight."""
        if self._runner is not None:
            return self._runner.batch_size(tuple(shape), 1 << 30)
        return 1024 if self.info.device.startswith("cuda") else 64

    def close(self, kill: bool = False) -> None:
        """Stop the worker (politely, or at once with ``kill``)."""
        self._closed = self._runner is None
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if not kill and proc.poll() is None:
            try:
                self._to_worker.send(None)
                proc.wait(timeout=5)
            except Exception:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for conn in (self._to_worker, self._from_worker):
            try:
                conn.close()
            except OSError:
                pass

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
