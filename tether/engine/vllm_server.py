"""`generation.vllm_mode: server`: the vLLM engine in a child process that tether starts and stops.

    backend = make_backend(gen, policy, tokenizer, precision=...)  # gen.vllm_mode == "server"
    backend.generate(...)       # the first call starts the child and waits until its engine is up
    backend.sync_weights()      # after every optimizer step: the new weights, no disk
    backend.close()             # "close", join, terminate if it does not stop

The child (`serve`, started with the "spawn" context) builds the same `vllm.LLM` as the colocated
`VLLMBackend` (same weightless model directory, same `engine_kwargs`) and answers requests on a
`multiprocessing` Pipe, one at a time, each answered `("ok", value)` or `("error", one line)`:

    ("generate", (requests, sampling kwargs))  -> per request, its completions as plain `Sample`s
    ("reload", shared weights | None)          -> the colocated reload path (`push_weights`)
    ("close", None)                            -> (no answer) the engine shut down, the child exits

Weights travel without disk and without pickling their values: at the first push the parent
copies `hf_weights(policy)` into CPU tensors in shared memory (`share_memory_()`) and sends that
dict once (torch.multiprocessing's reductions pass each storage by handle, here a file
descriptor); every later push copies the new values into the same tensors in place and sends
only ("reload", None). The child reloads from its views of the same memory. On a GPU the same
design works with CUDA tensors (torch.multiprocessing shares them through CUDA IPC handles,
which would save the host round trip); only the CPU path is tested here.

The child stops when told ("close"), when the parent's end of the pipe closes (the parent exited
or was killed: `recv` raises EOFError), and at interpreter exit (an atexit hook sends "close",
joins, then terminates). It is not a daemonic process: vLLM may start helper processes of its own
(on a GPU, e.g. to read device properties without initialising CUDA), which a daemon may not. It
ignores Ctrl-C: the trainer decides when it stops (Ctrl-C during a request terminates it at once,
the answer being abandoned).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its exit hook joins children: ours must run first)
import os
import signal
import time
import weakref

import torch
import torch.multiprocessing  # noqa: F401  (registers the reductions that share tensors by handle)
from torch import nn

from tether.config import GenerationConfig
from tether.engine.vllm_backend import (Sample, VLLMBackend, hf_weights, import_vllm,
                                        plain_outputs, push_weights, sampling_kwargs,
                                        shutdown_engine)

MODE = "generation.vllm_mode: server"
JOIN_TIMEOUT_S = 30.0  # how long `close` waits for the engine to shut down before terminating it


def one_line(err: BaseException, limit: int = 400) -> str:
    """'Type: message' with the message's whitespace (newlines too) collapsed, at most `limit`
    characters of message."""
    message = " ".join(str(err).split())
    if len(message) > limit:
        message = message[:limit - 3] + "..."
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# ---------------------------------------------------------------------------------------------
# The child


def _reply(conn, status: str, value) -> bool:
    """Send one answer; False when the parent is gone."""
    try:
        conn.send((status, value))
        return True
    except (OSError, EOFError):
        return False


def serve(conn, engine_kwargs: dict) -> None:
    """The child process: build the engine, say ("ok", None), then answer requests until
    "close" or until the parent's end of the pipe is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # shared weights reachable
    try:
        vllm = import_vllm()
        llm = vllm.LLM(**engine_kwargs)
    except BaseException as err:  # noqa: BLE001 (any failure goes back to the parent)
        _reply(conn, "error", f"building the engine failed: {one_line(err)}")
        return
    if not _reply(conn, "ok", None):
        return
    weights: dict[str, torch.Tensor] = {}
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):  # the parent exited or was killed
            break
        if op == "close":
            break
        try:
            if op == "generate":
                requests, params = payload
                result = plain_outputs(llm.generate(requests, vllm.SamplingParams(**params),
                                                    use_tqdm=False))
            elif op == "reload":
                if payload is not None:  # the first push: the parent's shared tensors
                    weights = payload
                push_weights(llm, list(weights.items()))
                result = None
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as err:  # noqa: BLE001
            ok = _reply(conn, "error", f"{op} failed: {one_line(err)}")
        else:
            ok = _reply(conn, "ok", result)
        if not ok:
            break
    shutdown_engine(llm)


# ---------------------------------------------------------------------------------------------
# The parent


def shared_copy(weights) -> dict[str, torch.Tensor]:
    """(name, tensor) pairs -> {name: a CPU copy in shared memory}, allocated once per run."""
    out = {}
    for name, tensor in weights:
        out[name] = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
        out[name].copy_(tensor)
    return out


@torch.no_grad()
def copy_into(buffers: dict[str, torch.Tensor], weights) -> None:
    """Copy (name, tensor) pairs into the shared buffers in place; the same names and shapes as
    the first push, else RuntimeError."""
    seen = set()
    for name, tensor in weights:
        buf = buffers.get(name)
        if buf is None or buf.shape != tensor.shape:
            raise RuntimeError(f"{MODE}: weight {name} {tuple(tensor.shape)} does not match the "
                               f"engine's first push")
        buf.copy_(tensor)
        seen.add(name)
    if seen != set(buffers):
        raise RuntimeError(f"{MODE}: the policy lacks {sorted(set(buffers) - seen)[:3]} of the "
                           f"engine's first push")


def stop_server(process, conn, directory, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Ask the child to close, wait `timeout` s, then terminate (and kill) it; remove its model
    directory. Safe to call on a child that already exited."""
    try:
        conn.send(("close", None))
    except (OSError, EOFError, ValueError):
        pass
    deadline = time.monotonic() + timeout
    while process.is_alive() and time.monotonic() < deadline:
        try:  # read what it still sends (a reply nobody waits for), so its `send` never blocks
            if conn.poll(0.1):
                conn.recv()
        except (OSError, EOFError, ValueError):
            process.join(max(0.0, deadline - time.monotonic()))
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)
    conn.close()
    if directory is not None:
        directory.cleanup()


class VLLMServerBackend(VLLMBackend):
    """`GenerationBackend` over a `vllm.LLM` in a child process (docs/generation.md). The child
    starts at the first `generate`; `close()` stops it (a later `generate` starts a new one)."""

    def __init__(self, module: nn.Module, tokenizer, *, gen: GenerationConfig,
                 precision: str = "fp32", seed: int = 0):
        super().__init__(module, tokenizer, gen=gen, precision=precision, seed=seed)
        self.process = None  # the child (a multiprocessing Process)
        self._conn = None
        self._weights: dict[str, torch.Tensor] | None = None  # shared with the child
        self._stop: weakref.finalize | None = None

    def _engine(self):
        if self.process is None:
            ctx = torch.multiprocessing.get_context("spawn")
            conn, child_conn = ctx.Pipe()
            kwargs = self.engine_kwargs(self._model_dir())
            process = ctx.Process(target=serve, args=(child_conn, kwargs),
                                  name="tether-vllm-server")
            process.start()
            child_conn.close()  # the child's end lives in the child only: its exit is our EOF
            self.process, self._conn, self._weights = process, conn, None
            # stops the child when this backend is dropped, or at exit: registered after
            # multiprocessing's own exit hook, so it runs before that one joins the children
            self._stop = weakref.finalize(self, stop_server, process, conn, self._dir)
            self._stop.atexit = False
            atexit.register(self._stop)
            self._stale = True
            self._receive("start")  # ("ok", None) once the engine is built
        return self.process

    def _receive(self, what: str):
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5.0)
            code = self.process.exitcode
            self.close()
            raise RuntimeError(f"{MODE}: the vLLM process exited during {what} (exit code "
                               f"{code})") from None
        except BaseException:  # Ctrl-C mid-request: nobody will read its answer, stop it now
            self.process.terminate()
            self.close()
            raise
        if status != "ok":
            if what == "start":
                self.close()
            raise RuntimeError(f"{MODE}: {value}")
        return value

    def _request(self, op: str, payload=None):
        try:
            self._conn.send((op, payload))
        except (OSError, EOFError):
            code = self.process.exitcode
            self.close()
            raise RuntimeError(f"{MODE}: the vLLM process is gone (exit code {code})") from None
        return self._receive(op)

    def sync_weights(self) -> None:
        """Copy the policy's current weights (LoRA merged) into the shared tensors and have the
        child reload from them. Before the child exists, only remembers that the next `generate`
        must push."""
        if self.process is None:
            self._stale = True
            return
        if self._weights is None:
            self._weights = shared_copy(hf_weights(self.module))
            self._request("reload", self._weights)  # sent once: the child keeps its views
        else:
            copy_into(self._weights, hf_weights(self.module))
            self._request("reload")
        self._stale = False
        self.syncs += 1

    def _samples(self, requests: list[dict], params, seed: int | None) -> list[list[Sample]]:
        return self._request("generate", (requests, sampling_kwargs(params, seed)))

    def close(self) -> None:
        """Stop the child (see `stop_server`) and free the shared weights."""
        if self._stop is not None:
            atexit.unregister(self._stop)
            self._stop()
        self.process = self._conn = self._stop = self._dir = self._weights = None
        self._stale = True
