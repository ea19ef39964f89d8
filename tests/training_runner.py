"""Runs training programs for the robustness tests in forked children of one process that imported them once, so
that each run (and each run killed with SIGKILL) costs its training, not another 5 s of imports.

Protocol, one JSON object a line: the test writes `{"program": "stage1", "argv": [...], "log": PATH,
"save_delay": SECONDS}` to stdin; the runner answers `{"pid": PID}` as soon as the child runs, then
`{"pid": PID, "returncode": CODE}` when it has ended (a negative code: killed by that signal). The child's output
goes to `log`. `save_delay` makes every flush of a checkpoint save sleep, so that a kill lands inside a save.

The runner itself runs no torch operation before forking: children start with no OpenMP thread pool to inherit.
"""

import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

from m2d2_hf.training import checkpoint


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def program(name: str):
    """The `main` of an example program, imported (once, in the runner) from its file."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


PROGRAMS = {
    "stage1": program("pretrain_stage1"),
    "stage2": program("pretrain_stage2"),
    "finetune": program("finetune_audio_classification"),
}


def slow_down_saves(delay: float) -> None:
    flush = checkpoint._fsync

    def slow_fsync(path):
        time.sleep(delay)
        flush(path)

    checkpoint._fsync = slow_fsync


def child(request: dict) -> None:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if request.get("save_delay"):
        slow_down_saves(request["save_delay"])
    try:
        PROGRAMS[request["program"]](request["argv"])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
