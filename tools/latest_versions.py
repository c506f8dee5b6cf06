"""The "latest" column of the version matrix, honestly: which versions of the packages seqwrap reaches into
are installed, which is the newest on the package index, and why a newer one could not be installed.

    python tools/latest_versions.py [--force] [--report FILE] [PACKAGE ...]   (default: transformers peft trl)

Prints one row per package. Exit status 1 when a package's newest release on the index is not the installed
one (the column would test an older release than it claims). --force first installs each such newest release
with --no-deps (pip's resolver refused it, e.g. a dependency missing from the index): the row then says
"forced" with the resolver's reason, and the exit status is 0 (the run asked for it).
Run by `make test-latest` (and `make test-latest FORCE_NEWEST=1`) with the column's own interpreter.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

PACKAGES = ("transformers", "peft", "trl")


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def newest_on_index(package: str) -> str:
    """The newest release pip sees on the configured index (`pip index versions`)."""
    out = _pip("index", "versions", package)
    found = re.search(rf"^{re.escape(package)} \(([^)]+)\)", out.stdout, flags=re.M | re.I)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"pip index versions {package} failed: {(out.stderr or out.stdout).strip()[-400:]}")
    return found.group(1)


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def why_not(package: str, version: str) -> str:
    """pip's reason for not installing package==version with its dependencies (a dry run)."""
    out = _pip("install", "--dry-run", "--quiet", f"{package}=={version}")
    if out.returncode == 0:
        return "installable (the resolver kept an older release for another package's pin)"
    lines = [l.strip() for l in out.stderr.splitlines() if "ERROR" in l or "requires" in l or "No matching" in l]
    lines = [re.sub(r" \(from versions: [^)]*\)", "", l) for l in lines]
    return "; ".join(dict.fromkeys(lines[-2:])) or out.stderr.strip()[-300:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", default=list(PACKAGES))
    ap.add_argument("--force", action="store_true", help="install a newest release the resolver refused, --no-deps")
    ap.add_argument("--report", help="also write the table to this file")
    args = ap.parse_args(argv)
    rows, behind = [], []
    for package in args.packages:
        newest, have = newest_on_index(package), installed(package)
        if have == newest:
            rows.append((package, have, newest, "newest"))
            continue
        reason = why_not(package, newest)
        if args.force:
            out = _pip("install", "--quiet", "--no-deps", f"{package}=={newest}")
            if out.returncode != 0:
                raise SystemExit(f"could not install {package}=={newest} even with --no-deps: {out.stderr[-400:]}")
            rows.append((package, installed(package), newest, f"forced with --no-deps ({reason})"))
        else:
            rows.append((package, have or "-", newest, f"NOT the newest: {reason}"))
            behind.append(package)
    width = max(len(r[0]) for r in rows)
    table = ["latest column: " + sys.executable,
             f"{'package':<{width}}  installed  newest on index  status"]
    table += [f"{p:<{width}}  {h:<9}  {n:<15}  {s}" for p, h, n, s in rows]
    text = "\n".join(table)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    if behind:
        print(f"\nFAIL: the latest column did not get the newest release of {', '.join(behind)} (see the reason); "
              "`make test-latest FORCE_NEWEST=1` installs it with --no-deps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
