"""The family census: every causal-LM family of the installed transformers through seqwrap.verify.

    python -m seqwrap.hf.census                              # all families, 2 worker processes, a table on stdout
    python -m seqwrap.hf.census --families llama,phi3 -v     # a subset, with each verify report
    python -m seqwrap.hf.census --write docs/support.md      # the support table (docs/support.md)
    python -m seqwrap.hf.census --json build/census.json     # the records, for tools

Families: the keys of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, each from its config class's
defaults, plus VARIANTS (census_variants.py: a family with a setting its defaults leave off, such as
Phi-3 with LongRoPE). Each family runs SeCO, and MsT, through verify in a worker process; a worker
that crashes or passes the per-family timeout is killed and replaced, and the family is recorded as
an error. Workers are long-lived (importing torch and transformers costs seconds) and run one
thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict

from .census_variants import VARIANTS

ENGINES = ("seco", "mst")
# a SeCO refusal that says "use attention='concat'" is followed by a run with it, recorded under CONCAT
CONCAT, CONCAT_HINT = "seco_concat", "attention='concat'"


# -- what one family gives (runs inside a worker) -----------------------------------------------------
def families() -> list[str]:
    """Every census entry: the causal-LM auto mapping's model types, then the variants."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + list(VARIANTS)


def run_family(name: str) -> dict:
    """One census record: {"family", "kind", "twin", "seco": report fields, "mst": report fields, "seconds"}."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .verify import verify

    start = time.perf_counter()
    model_type, settings = VARIANTS.get(name, (name, {}))
    record = {"family": name, "model_type": model_type, "kind": "?", "twin": ""}
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    try:
        if cls is None:
            raise LookupError(f"model_type {model_type!r} has no causal-LM class in transformers' auto mapping")
        cfg_cls = config_class(model_type, cls)
        if "is_decoder" in _field_names(cfg_cls) and "is_decoder" not in settings:
            settings = {**settings, "is_decoder": True}  # a BERT-like is a causal LM only as a decoder
        config = cfg_cls(**settings)
        record["kind"] = kind(config, cls)
    except Exception as exc:  # noqa: BLE001 - the family's defaults do not make a config
        text = " ".join(str(exc).split())[:400]
        for engine in ENGINES:
            record[engine] = {"status": "cannot-build", "exception": type(exc).__name__,
                              "message": f"the default config does not build: {text}"}
        record["seconds"] = time.perf_counter() - start
        return record
    for engine in ENGINES:
        record[engine] = _fields(verify(config, engine=engine, model_class=cls))
        record["twin"] = record["twin"] or record[engine]["twin"]
        if engine == "seco" and record["seco"]["status"] == "refused" and CONCAT_HINT in record["seco"]["message"]:
            # the refusal names the way out: check that way too (a user will take it)
            record[CONCAT] = _fields(verify(config, engine="seco", model_class=cls,
                                            engine_options={"attention": "concat"}))
    record["seconds"] = time.perf_counter() - start
    return record


def _fields(report) -> dict:
    fields = asdict(report)
    fields["groups"] = {g: [e["worst"], e["param"], e["count"]] for g, e in fields["groups"].items()}
    fields["passed"] = report.passed
    return fields


def _field_names(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def config_class(model_type: str, cls):
    """The family's own config class (exaone's ExaoneConfig for LlamaForCausalLM) where it is one the model
    class takes (a subclass of cls.config_class), else cls.config_class (Mllama's text config)."""
    from transformers import CONFIG_MAPPING

    own = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    return own if own is not None and issubclass(own, cls.config_class) else cls.config_class


def kind(config, cls) -> str:
    """decoder / encoder-decoder / encoder-as-decoder / multimodal: what the family is, for the table."""
    if cls.__name__.endswith("ForConditionalGeneration") or any(
            hasattr(config, k) for k in ("vision_config", "audio_config", "vq_config")):
        return "multimodal"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if {"is_decoder", "type_vocab_size"} <= _field_names(type(config)):  # BERT-likes: an encoder made causal
        return "encoder-as-decoder"
    return "decoder"


# -- the worker process -----------------------------------------------------------------------------------
def _worker() -> None:
    """Reads family names from stdin, writes one JSON record per line on the original stdout; anything the
    models print goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            record = run_family(name)
        except BaseException as exc:  # noqa: BLE001 - a bug of the census itself, recorded per family
            record = {"family": name, "kind": "?", "twin": "", "census_error": f"{type(exc).__name__}: {exc}"}
            for engine in ENGINES:
                record[engine] = {"status": "error", "exception": type(exc).__name__,
                                  "message": f"the census itself failed: {exc}"}
        out.write(json.dumps(record, default=str) + "\n")


class _Worker:
    """One worker process and a reader thread that hands its output lines over a queue."""

    def __init__(self, log):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "seqwrap.hf.census", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=root)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the process ended

    def ask(self, name: str, timeout: float):
        """The worker's record for `name`, or None when it died or timed out (then it is killed)."""
        try:
            self.proc.stdin.write(name + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except (BrokenPipeError, queue.Empty, OSError):
            line = None
        if line is None:
            self.kill()
            return None
        return json.loads(line)

    def wait_ready(self, timeout: float) -> bool:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        return line is not None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


def run_census(names: list[str] | None = None, *, workers: int = 2, timeout: float = 120.0,
               progress=None, log_path: str | None = None) -> list[dict]:
    """Records of `names` (default: all families), in the order given; `workers` processes in parallel.

    timeout: seconds per family (a family past it is killed and recorded as an error: hang or slow).
    progress(record): called as each family finishes. log_path: the workers' stderr (default: discarded)."""
    if names is None:
        names = _family_names()
    todo: queue.Queue = queue.Queue()
    for i, n in enumerate(names):
        todo.put((i, n))
    results: list[dict | None] = [None] * len(names)
    log = open(log_path, "a") if log_path else subprocess.DEVNULL

    def slot():
        worker = None
        while True:
            try:
                i, name = todo.get_nowait()
            except queue.Empty:
                break
            if worker is None:
                worker = _Worker(log)
                if not worker.wait_ready(300):
                    worker.kill()
                    worker = None
                    results[i] = _failed(name, "the worker process did not start")
                    continue
            t0 = time.perf_counter()
            record = worker.ask(name, timeout)
            if record is None:
                code = worker.proc.returncode
                why = (f"timed out after {timeout:.0f} s" if code in (-9, None) and time.perf_counter() - t0 >= timeout
                       else f"the worker process died (exit status {code})")
                record = _failed(name, why)
                worker = None
            results[i] = record
            if progress is not None:
                progress(record)
        if worker is not None:
            worker.close()

    threads = [threading.Thread(target=slot) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if log_path:
        log.close()
    return [r for r in results if r is not None]


def _family_names() -> list[str]:
    """families() without importing transformers into this process (a child lists them)."""
    code = "import json; from seqwrap.hf.census import families; print(json.dumps(families()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _failed(name: str, why: str) -> dict:
    record = {"family": name, "kind": "?", "twin": "", "seconds": None}
    for engine in ENGINES:
        record[engine] = {"status": "error", "exception": "WorkerFailure", "message": why}
    return record


def offenders(records: list[dict]) -> list[tuple[str, str, str]]:
    """(family, engine, status) for every wrong or error result (engine: seco, mst or seco_concat)."""
    return [(r["family"], e, r[e]["status"]) for r in records for e in ENGINES + (CONCAT,)
            if e in r and r[e]["status"] in ("wrong", "error")]


# -- command line -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqwrap.hf.census", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", help="comma-separated subset (default: $SEQWRAP_CENSUS_FAMILIES, else all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per family")
    p.add_argument("--write", metavar="MD", help="write the support table (docs/support.md) there")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON there")
    p.add_argument("--log", metavar="PATH", help="the workers' stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="print each family's verify reports")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    from .census_table import markdown, summary_line

    subset = args.families or os.environ.get("SEQWRAP_CENSUS_FAMILIES")
    names = [n.strip() for n in subset.split(",") if n.strip()] if subset else None
    start = time.perf_counter()

    def progress(r):
        line = summary_line(r)
        print(line, file=sys.stderr, flush=True)
        if args.verbose:
            for e in ENGINES:
                if r[e].get("message"):
                    print(f"    {e}: {r[e].get('exception') or ''} {r[e]['message']} {r[e].get('where', '')}",
                          file=sys.stderr)

    records = run_census(names, workers=args.workers, timeout=args.timeout, progress=progress, log_path=args.log)
    wall = time.perf_counter() - start
    text = markdown(records, full=names is None)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
    if not args.write:
        print(text)
    bad = offenders(records)
    print(f"census: {len(records)} families in {wall:.0f} s wall, {len(bad)} wrong/error results", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
