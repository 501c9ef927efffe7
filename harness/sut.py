"""The system under test (SUT): what an inference engine must do to be validated, in-process or as a process.

An in-process SUT subclasses `SystemUnderTest`. Any other engine, in any language, runs as a separate process
speaking JSON lines over stdin/stdout (suite/conformance/PROTOCOL.md); `ProcessSUT` is the harness's side of that
conversation. Either way the harness owns prompts, timing and verdicts, and measures the process from the outside
(`ProcessWatch`): a SUT never reports its own score.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import queue
import shlex
import subprocess
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashbench.reference.errors import FlashbenchError

PROTOCOL_VERSION = 1


class SUTError(FlashbenchError):
    """The SUT could not be run: it crashed, hung, broke the protocol or refused a request (exit code 2)."""


class SystemUnderTest(ABC):
    """An engine under validation or measurement. Logits are float tensors: [len(tokens), vocab] from `prefill`,
    [vocab] from `step`. `counters` may report what the SUT says it did (cumulative since `load`): bytes_read,
    neurons_loaded, reads, and per-token milliseconds by part ({"io": ..., "compute": ...})."""

    @property
    def pid(self) -> int:
        """The process whose memory and storage reads are the SUT's."""
        return os.getpid()

    @abstractmethod
    def hello(self) -> dict:
        """{"name": str, "flash": bool, "techniques": [str, ...]}: flash = it claims to read FFN weights from storage
        as tokens need them; techniques (optional) = the rows of the technique table (harness/matrix.py) it can
        switch, over which `flashbench run` measures its matrix."""

    @abstractmethod
    def load(self, checkpoint: Path, dram_budget: int, tolerance: str, techniques: tuple[str, ...] = (),
             settings: dict | None = None) -> int:
        """Load an HF checkpoint to run within `dram_budget` bytes of weights, and return its vocabulary size;
        `tolerance` ("exact" or "approximate") is the tier the SUT will be judged at. A SUT that declared
        techniques gets the ones to switch on (the others off) and the run's settings (window, hybrid, threads,
        storage_dtype, compute_dtype, ...); one that declared none is called with the first three only."""

    @abstractmethod
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Start a new sequence."""

    @abstractmethod
    def step(self, token: int) -> torch.Tensor:
        """One more token of the current sequence."""

    def counters(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def reported(counters: dict, key: str) -> float | None:
    """A number a SUT reports in its counters, or None where it reports none (or something else)."""
    value = counters.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Guarded:
    """A SUT as the harness calls it: an exception raised inside a call is the SUT's (a SUTError naming the call);
    one raised anywhere else in the harness is the harness's own bug and propagates as it is."""

    def __init__(self, sut: SystemUnderTest):
        self.sut = sut

    def _call(self, op: str, *args, **kwargs):
        try:
            return getattr(self.sut, op)(*args, **kwargs)
        except SUTError:
            raise
        except Exception as e:
            raise SUTError(f"the SUT raised {type(e).__name__} in '{op}': {e}") from e

    def hello(self) -> dict:
        return self._call("hello")

    def load(self, hello: dict, checkpoint: Path, dram_budget: int, tolerance: str, techniques: tuple[str, ...] = (),
             settings: dict | None = None) -> int:
        """`load` as the SUT's hello allows: techniques and settings only to a SUT that declared techniques, so one
        written before they existed keeps working unchanged."""
        if not hello.get("techniques"):
            if techniques:
                raise SUTError(f"{hello['name']} declares no techniques, asked to switch on {', '.join(techniques)}")
            return self._call("load", checkpoint, dram_budget, tolerance)
        return self._call("load", checkpoint, dram_budget, tolerance, techniques=tuple(techniques),
                          settings=settings or {})

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        return self._call("prefill", tokens)

    def step(self, token: int) -> torch.Tensor:
        return self._call("step", token)

    def counters(self) -> dict:
        return self._call("counters")


def sut_from_spec(spec: str) -> SystemUnderTest:
    """"package.module:Class" -> an instance (the class takes no arguments)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SUTError(f"--sut {spec!r}: expected module:Class, e.g. flashbench.harness.adapters:ReferenceSUT")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SUTError(f"--sut {spec!r}: cannot import it ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, SystemUnderTest)):
        raise SUTError(f"--sut {spec!r}: not a subclass of flashbench.harness.sut.SystemUnderTest")
    return cls()


# ---- logits on the wire --------------------------------------------------------------------------------------


def encode_logits(logits: torch.Tensor) -> dict:
    array = logits.detach().float().cpu().numpy().astype("<f4")
    return {"shape": list(array.shape), "dtype": "float32", "base64": base64.b64encode(array.tobytes()).decode()}


def decode_logits(obj, shape: tuple[int, ...], op: str) -> torch.Tensor:
    """{"shape", "dtype": "float32", "base64"} or {"shape", "values": nested lists} -> a tensor of `shape`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("shape"), list):
        raise SUTError(f"'{op}': logits must be an object with a shape (a list) and base64 or values "
                       f"(PROTOCOL.md), got {str(obj)[:80]!r}")
    if obj["shape"] != list(shape):
        raise SUTError(f"'{op}': logits of shape {str(obj['shape'])[:80]}, expected {list(shape)}")
    try:
        if "base64" in obj:
            if obj.get("dtype", "float32") != "float32":
                raise SUTError(f"'{op}': base64 logits must be float32, got {obj.get('dtype')!r}")
            array = np.frombuffer(base64.b64decode(obj["base64"], validate=True), dtype="<f4").reshape(shape)
        else:
            array = np.asarray(obj["values"], dtype=np.float32).reshape(shape)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise SUTError(f"'{op}': logits cannot be read as {list(shape)} float32 ({str(e)[:200]})") from e
    logits = torch.from_numpy(array.copy())
    if not torch.isfinite(logits).all():
        raise SUTError(f"'{op}': logits contain NaN or Inf")
    return logits


# ---- a SUT as a process ----------------------------------------------------------------------------------------


def parse_answer(line: str, expected_id: int, op: str) -> dict:
    """One answer line -> its object, or a SUTError saying what is wrong with it."""
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise SUTError(f"answered '{op}' with a line that is not JSON ({str(e)[:80]}): {line[:120]!r}") from None
    if not isinstance(answer, dict) or answer.get("id") != expected_id or not isinstance(answer.get("ok"), bool):
        raise SUTError(f"answered '{op}' with {line[:120]!r}: expected an object with the request's id "
                       f"({expected_id}) and ok true/false")
    if not answer["ok"]:
        raise SUTError(f"refused '{op}': {str(answer.get('error', 'no error given'))[:500]}")
    return answer


class ProcessSUT(SystemUnderTest):
    """A SUT in its own process, spoken to in JSON lines (one request, one answer). A crash, a request left
    unanswered for `timeout_s` (hello and load: `load_timeout_s`), or a line that is not a JSON answer is a
    `SUTError` that says what happened and ends with the SUT's last stderr lines."""

    def __init__(self, command: str, timeout_s: float = 60.0, load_timeout_s: float = 600.0):
        self.command, self.timeout_s, self.load_timeout_s = command, timeout_s, load_timeout_s
        self.vocab_size: int | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(shlex.split(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True, bufsize=1, encoding="utf-8",
                                         errors="replace")  # a stray byte is a bad line, not a dead reader
        except OSError as e:
            raise SUTError(f"--sut-cmd {command!r}: cannot start it ({e})") from e
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._id = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        tail = self._stderr.read().strip().splitlines()[-5:]
        return ("; its stderr ends: " + " | ".join(tail)) if tail else "; its stderr is empty"

    def _fail(self, message: str) -> SUTError:
        self.proc.kill()
        self.proc.wait()
        return SUTError(f"SUT {self.command!r}: {message}{self._stderr_tail()}")

    def call(self, op: str, timeout_s: float | None = None, **fields) -> dict:
        self._id += 1
        try:
            self.proc.stdin.write(json.dumps({"id": self._id, "op": op} | fields) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail(f"exited (code {self.proc.wait()}) before '{op}' could be sent") from None
        try:
            line = self._lines.get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            raise self._fail(f"did not answer '{op}' within {timeout_s or self.timeout_s:g} s (hung?)") from None
        if line is None:
            raise self._fail(f"exited (code {self.proc.wait()}) without answering '{op}'")
        try:
            return parse_answer(line, self._id, op)
        except SUTError as e:
            raise self._fail(str(e)) from None

    def hello(self) -> dict:
        answer = self.call("hello", self.load_timeout_s, protocol=PROTOCOL_VERSION)  # start-up may import a lot
        if not isinstance(answer.get("name"), str) or not isinstance(answer.get("flash"), bool):
            raise self._fail("answered 'hello' without a name (string) and flash (true/false)")
        techniques = answer.get("techniques", [])
        if not isinstance(techniques, list) or not all(isinstance(t, str) for t in techniques):
            raise self._fail(f"answered 'hello' with techniques {str(techniques)[:80]}: expected a list of names")
        return {"name": answer["name"], "flash": answer["flash"]} | ({"techniques": techniques} if techniques else {})

    def load(self, checkpoint: Path, dram_budget: int, tolerance: str, techniques: tuple[str, ...] | None = None,
             settings: dict | None = None) -> int:
        extension = {} if techniques is None else {"techniques": list(techniques), "settings": settings or {}}
        answer = self.call("load", self.load_timeout_s, checkpoint=str(checkpoint), dram_budget=dram_budget,
                           tolerance=tolerance, **extension)
        if type(answer.get("vocab_size")) is not int or answer["vocab_size"] <= 0:
            raise self._fail("answered 'load' without vocab_size (a positive integer)")
        self.vocab_size = answer["vocab_size"]
        return self.vocab_size

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        return decode_logits(self.call("prefill", tokens=tokens).get("logits"), (len(tokens), self.vocab_size),
                             "prefill")

    def step(self, token: int) -> torch.Tensor:
        return decode_logits(self.call("step", token=token).get("logits"), (self.vocab_size,), "step")

    def counters(self) -> dict:
        answer = self.call("counters")
        return {k: v for k, v in answer.items() if k not in ("id", "ok")}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("close", timeout_s=10)
            except SUTError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


# ---- measuring a process from the outside ------------------------------------------------------------------------


class MemoryCap:
    """A SUT process in a cgroup-v1 memory group of its own. Pages are charged to the group from when the process
    joins, and `cap(extra)` limits the group to its charge then plus `extra`: a SUT that holds more is killed by
    the kernel (page cache beyond it is evicted instead). Root only; elsewhere `group` is None and `reason` says
    why."""

    def __init__(self, pid: int):
        from .peers import enter_cgroup, remove_stale_groups

        remove_stale_groups()
        self.group, where = enter_cgroup(f"flashbench-sut-{pid}", pid)  # charged from here on
        self.reason = "" if self.group else where
        self.limit = 0

    def cap(self, extra: int) -> None:
        if self.group is not None:
            self.limit = int((self.group / "memory.usage_in_bytes").read_text()) + extra
            (self.group / "memory.limit_in_bytes").write_text(str(self.limit))

    def oom_kills(self) -> int:
        if self.group is None:
            return 0
        control = dict(line.split() for line in (self.group / "memory.oom_control").read_text().splitlines())
        return int(control.get("oom_kill", 0))

    def remove(self) -> None:
        if self.group is not None:
            try:
                self.group.rmdir()
            except OSError:
                pass  # a process still in it: remove_stale_groups takes it next time


@dataclass(frozen=True)
class Usage:
    held: int  # bytes of data resident now: anonymous memory and mapped data files, not mapped code
    rss: int  # bytes resident now, code included
    peak_rss: int  # VmHWM: the most resident since the peak was last reset
    read_bytes: int  # bytes this process caused to be fetched from storage (/proc/PID/io)


class ProcessWatch:
    """Memory and storage reads of one process, from /proc (Linux)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exe = os.path.realpath(f"/proc/{pid}/exe")

    def held(self) -> int:
        """Resident data: anonymous memory, and mapped files other than code (a model's mmapped weights count).
        Mapped code (shared libraries, the executable) is left out: a runtime pages it in as code first runs, and
        the page cache may have been dropped just before."""
        total, counting = 0, False
        for line in Path(f"/proc/{self.pid}/smaps").read_text().splitlines():
            fields = line.split(None, 5)
            if len(fields) >= 5 and "-" in fields[0] and len(fields[1]) == 4:  # a mapping's header line
                path = fields[5].strip() if len(fields) == 6 else ""
                counting = "x" not in fields[1] and ".so" not in path and path != self.exe
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
        return total

    def usage(self) -> Usage:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kib = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in status.splitlines())
               if k in ("VmRSS", "VmHWM")}
        io = dict(line.split(": ") for line in Path(f"/proc/{self.pid}/io").read_text().splitlines())
        return Usage(self.held(), kib["VmRSS"], kib["VmHWM"], int(io["read_bytes"]))

    def reset_peak(self) -> bool:
        """Start VmHWM again from the current RSS (clear_refs 5); False where the kernel refuses."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False
