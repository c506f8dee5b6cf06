"""Runs a snippet in a fresh interpreter, so a crash (segfault, SIGFPE, sanitizer abort) fails
one test instead of killing the test runner.

The child inherits the environment (under `make asan`: PYTHONPATH to the sanitized build and
LD_PRELOAD of the sanitizer runtimes), and checks that it loaded the same kind of build as the
parent."""
import os
import subprocess
import sys
import textwrap

import seqwrap

_PRELUDE = """
import seqwrap, sys
if seqwrap._C.build_info()["sanitize"] != {sanitize}:
    sys.exit("the child loaded another build of seqwrap._C: " + seqwrap._C.__file__)
"""


def run_isolated(code: str, timeout: float = 120.0) -> str:
    """Runs `code` in a child interpreter; returns its stdout. Fails the calling test with the
    child's output when it exits with a non-zero status or by a signal."""
    prelude = _PRELUDE.format(sanitize=seqwrap._C.build_info()["sanitize"])
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ), cwd=os.getcwd())
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        raise AssertionError(f"child interpreter ended with {how}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout
