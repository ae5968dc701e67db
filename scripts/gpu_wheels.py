"""The wheels a GPU machine without network access lacks (docs/gpu.md), fetched here and unpacked there.

    python scripts/gpu_wheels.py --download .whl            # here (`make gpu-wheels`): pip can reach a registry
    python scripts/gpu_wheels.py --install .whl --target T  # there (`make gpu-check`): no network, no pip needed

The GPU machine this was prepared for (one H200) has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17,
accelerate 1.15, peft and safetensors, and no network; the working tree and carried paths may total 64 MiB.
So the wheels are the versions this project's CI runs (read from this environment), for CPython 3.12 on
manylinux x86_64, and bitsandbytes' wheel (43 MB: one kernel library per CUDA release from 11.8 to 13.2) keeps
only the CUDA 13 libraries, which is what torch 2.11's CUDA 13 loads (``bitsandbytes/cextension.py`` picks
``libbitsandbytes_cuda{major}{minor}.so`` from ``torch.version.cuda``). Its RECORD is rewritten to match.

TRL needs datasets, which needs pyarrow (55 MB) and pandas: they do not fit, so the GPU tests train through
transformers' ``Trainer`` (TRL's ``SFTTrainer`` is a subclass; the callbacks are the same), and TRL's own tests
run only where the device has pyarrow and pandas already (``--install`` unpacks TRL's group only then).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import importlib.util
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

# What the device lacks: the training stack at this project's versions, pytest, and (beside pyarrow + pandas only)
# TRL with datasets; each with every dependency it has here, but for what torch already brings to the device.
CORE = ["bitsandbytes", "transformers", "peft", "accelerate", "pytest"]
TRL_GROUP = ["trl", "datasets"]
SUPPLIED = {"torch", "triton", "numpy", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock",
            "typing-extensions", "setuptools", "pyarrow", "pandas"}  # fmt: skip
KEEP_CUDA = re.compile(r"bitsandbytes/libbitsandbytes_(cuda13\d|cpu)\.so$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], python: str, skip: set[str] = frozenset()) -> list[str]:
    """``roots`` and every dependency they have in this environment (markers read for CPython ``python`` on
    Linux x86_64), but for what the device supplies (``SUPPLIED``, CUDA libraries) and ``skip``."""
    from packaging.requirements import Requirement

    env = {
        "python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
    }  # fmt: skip
    found: list[str] = []
    stack = list(roots)
    while stack:
        name = canonical(stack.pop())
        if name in found or name in skip or name in SUPPLIED or name.startswith(("nvidia-", "cuda-")):
            continue
        found.append(name)
        for line in md.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(env):
                stack.append(requirement.name)
    return sorted(found)


def download(dest: Path, python: str = "3.12") -> None:
    """Every wheel of both closures at this environment's version, for CPython ``python`` on manylinux x86_64;
    then slim bitsandbytes; ``groups.json`` says which wheel belongs to which group."""
    dest.mkdir(parents=True, exist_ok=True)
    core = closure(CORE, python)
    trl = closure(TRL_GROUP, python, skip=set(core))
    pins = [f"{name}=={md.version(name)}" for name in core + trl]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python]
    abi = "cp" + python.replace(".", "")
    command += ["--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "any"):
        command += ["--platform", tag]
    subprocess.run([*command, "-d", str(dest), *pins], check=True)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    (dest / "groups.json").write_text(json.dumps({"core": core, "trl": trl}, indent=1))
    total = sum(w.stat().st_size for w in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}: {total / 2**20:.1f} MiB")


def slim_bitsandbytes(wheel: Path) -> None:
    """Drop every kernel library but CUDA 13's and the CPU one; rewrite RECORD so the wheel stays valid."""
    with zipfile.ZipFile(wheel) as source:
        names = [n for n in source.namelist() if not n.endswith(".so") or KEEP_CUDA.search(n)]
        if len(names) == len(source.namelist()):
            return  # already slim
        files = {n: source.read(n) for n in names}
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    files[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in files.items():
            target.writestr(name, data)
    wheel.write_bytes(buffer.getvalue())


def install(source: Path, target: Path) -> None:
    """Unpack the wheels into ``target`` (put first on PYTHONPATH); TRL's group only beside pyarrow and pandas."""
    target.mkdir(parents=True, exist_ok=True)
    groups = json.loads((source / "groups.json").read_text())
    arrow = all(importlib.util.find_spec(name) for name in ("pyarrow", "pandas"))
    wanted = set(groups["core"] + (groups["trl"] if arrow else []))
    for wheel in sorted(source.glob("*.whl")):
        if canonical(wheel.name.split("-")[0]) not in wanted:
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        print(f"unpacked {wheel.name}")
    if not arrow:
        print("pyarrow/pandas missing on this machine: TRL and datasets not unpacked (their tests skip)")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download", type=Path, help="fetch the wheels into this folder")
    parser.add_argument("--install", type=Path, help="unpack the wheels of this folder ...")
    parser.add_argument("--target", type=Path, help="... into this one")
    parser.add_argument("--python", default="3.12", help="the device's Python version (for --download)")
    args = parser.parse_args()
    if args.download:
        download(args.download, args.python)
    elif args.install and args.target:
        install(args.install, args.target)
    else:
        parser.error("give --download FOLDER, or --install FOLDER --target FOLDER")


if __name__ == "__main__":
    main()
