"""Runs a snippet in a fresh interpreter, so a crash (segfault, SIGFPE, sanitizer abort) fails
one test instead of killing the test runner.

The child inherits the environment (under `make asan`: LD_PRELOAD of the sanitizer runtimes),
starts in the directory the parent's seqwrap was imported from (so `python -c` finds that copy
first: the sanitized one under `make asan`), and checks that it loaded the same kind of build."""
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
    root = os.path.dirname(os.path.dirname(os.path.abspath(seqwrap.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        raise AssertionError(f"child interpreter ended with {how}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout
