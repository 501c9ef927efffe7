"""Any in-process SUT as a process speaking suite/conformance/PROTOCOL.md:

    python -m flashbench.harness.serve flashbench.harness.adapters:ReferenceSUT

which is what `flashbench validate --sut-cmd` runs to validate the reference engine through the protocol.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import TextIO

from .sut import PROTOCOL_VERSION, SystemUnderTest, encode_logits, sut_from_spec


def answer(sut: SystemUnderTest, request: dict) -> dict:
    op = request.get("op")
    if op == "hello":
        return sut.hello() | {"protocol": PROTOCOL_VERSION}
    if op == "load":
        extension = ({"techniques": tuple(request["techniques"]), "settings": request.get("settings") or {}}
                     if "techniques" in request else {})
        return {"vocab_size": sut.load(Path(request["checkpoint"]), int(request["dram_budget"]), request["tolerance"],
                                       **extension)}
    if op == "prefill":
        return {"logits": encode_logits(sut.prefill([int(t) for t in request["tokens"]]))}
    if op == "step":
        return {"logits": encode_logits(sut.step(int(request["token"])))}
    if op == "counters":
        return sut.counters()
    if op == "close":
        sut.close()
        return {}
    raise ValueError(f"unknown op {op!r}")


def serve(sut: SystemUnderTest, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """One answer line per request line, until 'close' or the end of stdin. An error becomes ok: false with the
    reason, and the traceback goes to stderr."""
    for line in stdin:
        request: dict = {}
        try:
            request = json.loads(line)
            reply = {"id": request.get("id"), "ok": True} | answer(sut, request)
        except Exception as e:  # noqa: BLE001 - every failure is reported to the harness, which decides
            traceback.print_exc(file=sys.stderr)
            reply = {"id": request.get("id") if isinstance(request, dict) else None, "ok": False,
                     "error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
        if request.get("op") == "close":
            return


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flashbench.harness.serve module:Class")
    serve(sut_from_spec(sys.argv[1]))
