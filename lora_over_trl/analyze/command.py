"""Analysis of trained adapters, as commands that write tables and pictures.

    python -m lora_over_trl.analyze spectrum runs/demo_cpu [--vs runs/demo_cpu_lora] [--load_in_4bit]
    python -m lora_over_trl.analyze spectrum path/to/peft_adapter --base meta-llama/Llama-2-7b-hf --modules 'q_proj'
    python -m lora_over_trl.analyze landscape runs/demo_cpu --data recipes/data/arithmetic/test.jsonl --dims 2

``spectrum``: per adapted module, the singular values of ``dW = s B A``, effective and stable rank, alignment
with the base weight's top singular directions and intruder dimensions (see :mod:`lora_over_trl.analyze.spectrum`),
module by module so memory stays at one layer. Works on any run of ours (``adapter/``) and any stock PEFT
LoRA adapter. The base comes from ``--base`` or the adapter's config; with ``--load_in_4bit`` each base
weight is NF4-quantized and dequantized first, as the adapter saw it in a QLoRA run. Writes
``spectrum.json``, ``spectrum.md``, ``spectra.png`` and ``effective_rank.png`` into ``--output`` (default
``PATH/analysis-spectrum``), whole or not at all.

``landscape``: the loss on held-out examples along one or two filter-normalized random directions in the
adapter's parameter space around the trained point (see :mod:`lora_over_trl.analyze.landscape`): a curve or a contour
(``landscape.png``), the grid and sharpness summaries (``landscape.json``), into ``PATH/analysis-landscape``.
Data: a ``.jsonl`` file with ``text``, ``prompt`` + ``completion``, ``question`` + ``answer`` (GSM8K) or
``messages`` rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lora_over_trl.analyze.adapters import AnalysisError, BaseWeights, adapter_folder, adapter_updates
from lora_over_trl.analyze.landscape_report import run_landscape

__all__ = ["main", "make_parser", "spectrum_report"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_over_trl.analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    spectrum = commands.add_parser("spectrum", help="spectra, ranks, alignment and intruders of each update")
    spectrum.add_argument("path", help="run folder (with adapter/) or PEFT LoRA adapter folder")
    spectrum.add_argument("--base", default=None, help="base model folder or hub id (default: adapter config)")
    spectrum.add_argument("--vs", default=None, help="a second run or adapter to compare with")
    spectrum.add_argument("--load_in_4bit", action="store_true", help="NF4-quantize base weights as QLoRA saw them")
    spectrum.add_argument("--top_k", type=int, default=10, help="top singular directions compared (default 10)")
    spectrum.add_argument("--threshold", type=float, default=0.5, help="intruder if best |cosine| is below this")
    spectrum.add_argument("--modules", default=None, help="regex: analyze only modules whose name matches")
    spectrum.add_argument("--output", default=None, help="results folder (default: PATH/analysis-spectrum)")
    landscape = commands.add_parser("landscape", help="loss around the trained adapter along random directions")
    landscape.add_argument("path", help="run folder (with adapter/) or PEFT LoRA adapter folder")
    landscape.add_argument("--data", required=True, help="held-out examples, .jsonl")
    landscape.add_argument("--base", default=None, help="base model folder or hub id (default: adapter config)")
    landscape.add_argument("--load_in_4bit", action="store_true", help="load the base in 4-bit NF4 (as trained)")
    landscape.add_argument("--dims", type=int, choices=[1, 2], default=1)
    landscape.add_argument("--grid", type=int, default=21, help="points per direction (odd: the center is on it)")
    landscape.add_argument("--radius", type=float, default=1.0, help="the grid spans [-radius, radius]")
    landscape.add_argument("--examples", type=int, default=16, help="held-out examples the loss averages over")
    landscape.add_argument("--batch_size", type=int, default=4)
    landscape.add_argument("--max_length", type=int, default=256)
    landscape.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    landscape.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    landscape.add_argument("--output", default=None, help="results folder (default: PATH/analysis-landscape)")
    return parser


# ---- inputs -------------------------------------------------------------------------------------------------


def spectrum_report(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every module's :class:`~lora_over_trl.analyze.spectrum.ModuleSpectrum` of one adapter, as a dict."""
    from lora_over_trl.analyze.spectrum import module_spectrum

    folder = adapter_folder(path)
    config, updates = adapter_updates(folder, args.modules)
    base_name = args.base or config.get("base_model_name_or_path")
    if not base_name:
        raise AnalysisError(f"{folder}/adapter_config.json names no base model; pass --base")
    base = BaseWeights(base_name, args.load_in_4bit)
    modules = []
    for module, (b, a, scaling) in updates.items():
        w0 = base.weight(module, (b.shape[0], a.shape[1]))
        result = module_spectrum(module, b, a, scaling, w0, top_k=args.top_k, threshold=args.threshold)
        modules.append(result.as_dict())
    return {"adapter": str(folder), "base": base_name, "load_in_4bit": args.load_in_4bit, "modules": modules}


def table(report: dict[str, Any]) -> str:
    lines = [
        f"adapter {report['adapter']} on {report['base']}",
        "| module | rank | effective rank | stable rank | alignment | intruders |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in report["modules"]:
        lines.append(
            f"| {m['module']} | {m['rank']} | {m['effective_rank']:.2f} | {m['stable_rank']:.2f} | "
            f"{m['alignment']:.3f} | {m['intruders']} |"
        )
    return "\n".join(lines) + "\n"


def draw_spectra(reports: list[dict[str, Any]], spectra_path: Path, heatmap_path: Path) -> None:
    """Normalized spectra per module type, and effective rank across layers, one column per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_over_trl.utils.fields import layer_index

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        by_type: dict[str, list[list[float]]] = {}
        for m in report["modules"]:
            by_type.setdefault(m["module"].rsplit(".", 1)[-1], []).append(m["singular_values"])
        for kind, spectra in sorted(by_type.items()):
            width = max(len(s) for s in spectra)
            mean = [sum(s[i] / s[0] for s in spectra if len(s) > i and s[0] > 0) / len(spectra) for i in range(width)]
            ax.plot(range(1, width + 1), mean, marker=".", label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("sigma_i / sigma_1 (mean over layers)")
        ax.set_title(Path(report["adapter"]).parent.name or report["adapter"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(spectra_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        kinds = sorted({m["module"].rsplit(".", 1)[-1] for m in report["modules"]})
        layers = sorted({layer_index(m["module"]) or 0 for m in report["modules"]})
        grid = [[float("nan")] * len(layers) for _ in kinds]
        for m in report["modules"]:
            grid[kinds.index(m["module"].rsplit(".", 1)[-1])][layers.index(layer_index(m["module"]) or 0)] = m[
                "effective_rank"
            ]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_xlabel("layer")
        ax.set_title(f"effective rank: {Path(report['adapter']).parent.name or report['adapter']}", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(heatmap_path, dpi=110)
    plt.close(fig)


def run_spectrum(args: argparse.Namespace) -> Path:
    from lora_over_trl.utils.atomic import staged_directory

    path = Path(args.path)
    if not path.exists():
        raise AnalysisError(f"{path} does not exist")
    if args.top_k < 1 or not 0 < args.threshold < 1:
        raise AnalysisError("--top_k must be >= 1 and --threshold in (0, 1)")
    reports = [spectrum_report(path, args)]
    if args.vs:
        if not Path(args.vs).exists():
            raise AnalysisError(f"--vs {args.vs} does not exist")
        reports.append(spectrum_report(Path(args.vs), args))
    output = Path(args.output) if args.output else path / "analysis-spectrum"
    with staged_directory(output, overwrite=True) as staging:
        (staging / "spectrum.json").write_text(json.dumps(reports, indent=1))
        text = "\n".join(table(r) for r in reports)
        (staging / "spectrum.md").write_text(text)
        draw_spectra(reports, staging / "spectra.png", staging / "effective_rank.png")
    print(text)
    return output


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        output = run_spectrum(args) if args.command == "spectrum" else run_landscape(args)
    except (AnalysisError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written to {output}")
    return 0
