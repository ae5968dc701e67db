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
import re
import sys
from pathlib import Path
from typing import Any

from lora_over_trl.utils.errors import first_line, one_line

__all__ = ["AnalysisError", "main", "spectrum_report"]


class AnalysisError(ValueError):
    """Bad input: reported as one line, exit code 2."""


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


def adapter_folder(path: Path) -> Path:
    """The PEFT adapter folder in ``path`` (itself or its ``adapter/``)."""
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            if (candidate / "lora_over.json").is_file():
                raise AnalysisError(
                    f"{candidate} is an over-parameterized training checkpoint; analyze the run's adapter/"
                )
            return candidate
    raise AnalysisError(f"{path}: no adapter_config.json in it or in its adapter/ folder")


def adapter_updates(folder: Path, pattern: str | None) -> tuple[dict[str, Any], dict[str, tuple]]:
    """``(adapter config, {module: (B, A, scaling)})`` from a PEFT LoRA adapter folder."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AnalysisError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters are analyzed")
    weights = load_file(folder / "adapter_model.safetensors")
    updates = {}
    for key, a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        if pattern and not re.search(pattern, module):
            continue
        b = weights[key.replace("lora_A", "lora_B")]
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        updates[module] = (b.float(), a.float(), alpha / (r**0.5 if config.get("use_rslora") else r))
    if not updates:
        raise AnalysisError(f"{folder}: no LoRA module" + (f" matches --modules {pattern!r}" if pattern else ""))
    return config, dict(sorted(updates.items(), key=lambda item: _module_order(item[0])))


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT: a key matches a module name that ends with it (regex)
        if re.search(rf"(^|\.){key}$", module):
            return value
    return default


def _module_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


class BaseWeights:
    """Weights of a base checkpoint, read one tensor at a time from its safetensors files."""

    def __init__(self, name_or_path: str, load_in_4bit: bool = False) -> None:
        from safetensors import safe_open

        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = self._from_hub_cache(name_or_path)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise AnalysisError(f"base {name_or_path}: no .safetensors weights in {folder}")
        self.name, self.load_in_4bit, self.files = name_or_path, load_in_4bit, {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), file))

    @staticmethod
    def _from_hub_cache(name: str) -> Path:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as err:
            raise AnalysisError(
                f"base {name}: not a local folder and not available from the hub ({first_line(err)})"
            ) from err

    def weight(self, module: str, shape: tuple[int, int]):
        """``W0`` of ``module`` in float32 (after an NF4 round trip with ``load_in_4bit``)."""
        from safetensors import safe_open

        key = next((k for k in (f"{module}.weight", f"model.{module}.weight") if k in self.files), None)
        if key is None:
            raise AnalysisError(f"base {self.name} has no weight for the adapter's module {module}")
        with safe_open(self.files[key], framework="pt") as handle:
            weight = handle.get_tensor(key)
        if tuple(weight.shape) != shape:
            raise AnalysisError(
                f"base {self.name} does not match the adapter: {module} is {tuple(weight.shape)} there, "
                f"{shape} in the adapter"
            )
        if self.load_in_4bit:
            import bitsandbytes.functional as bnb_functional

            quantized, state = bnb_functional.quantize_4bit(weight.float(), blocksize=64, quant_type="nf4")
            weight = bnb_functional.dequantize_4bit(quantized, state)
        return weight.float()


# ---- the report ---------------------------------------------------------------------------------------------


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


def example_texts(path: Path, tokenizer: Any, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` ``(prompt, completion)`` pairs from a ``.jsonl`` file (prompt empty for plain text and
    chats); an AnalysisError when no row is usable. The loss is taken on the completion, as SFT trained it."""
    texts = []
    with path.open() as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            if isinstance(row.get("text"), str):
                texts.append(("", row["text"]))
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                texts.append((row["prompt"], row["completion"]))
            elif isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
                texts.append((f"Question: {row['question']}\nAnswer:", " " + row["answer"]))  # lm-eval's GSM8K prompt
            elif isinstance(row.get("messages"), list) and getattr(tokenizer, "chat_template", None):
                texts.append(("", tokenizer.apply_chat_template(row["messages"], tokenize=False)))
            if len(texts) == limit:
                break
    if not texts:
        raise AnalysisError(
            f"--data {path}: no usable rows (need text, prompt + completion, question + answer, or messages)"
        )
    return texts


def run_landscape(args: argparse.Namespace) -> Path:
    import torch
    from tqdm.auto import tqdm

    from lora_over_trl.analyze.landscape import filter_normalized_direction, landscape_grid, sharpness
    from lora_over_trl.eval.command import load_model
    from lora_over_trl.utils.atomic import staged_directory

    path, data = Path(args.path), Path(args.data)
    if not path.exists():
        raise AnalysisError(f"{path} does not exist")
    if not data.is_file():
        raise AnalysisError(f"--data {data} is not a file")
    if args.grid < 2:
        raise AnalysisError(f"--grid must be at least 2 (points per direction), got {args.grid}")
    if args.radius <= 0 or args.examples < 1 or args.batch_size < 1:
        raise AnalysisError("--radius must be > 0, --examples and --batch_size >= 1")
    folder = adapter_folder(path)
    config = json.loads((folder / "adapter_config.json").read_text())
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        raise AnalysisError(f"{folder}/adapter_config.json names no base model; pass --base")
    if not Path(base).is_dir():
        BaseWeights._from_hub_cache(base)  # a clear error when the base is nowhere
    loading = argparse.Namespace(device=args.device, dtype="float32", load_in_4bit=args.load_in_4bit)
    try:
        model, tokenizer = load_model(base, folder, loading)
    except (OSError, RuntimeError) as err:  # shapes that do not match, unreadable files
        raise AnalysisError(f"cannot load {folder} on {base}: {one_line(err)[:300]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # prompts are masked from the left of each row
    texts = example_texts(data, tokenizer, args.examples)
    batches = []
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        enc = tokenizer(
            [prompt + completion for prompt, completion in batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=args.max_length,
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for row, (prompt, _) in enumerate(batch):  # no loss on the prompt (right padding assumed)
            labels[row, : len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else 0] = -100
        batches.append({**{k: v.to(model.device) for k, v in enc.items()}, "labels": labels.to(model.device)})

    def loss() -> float:  # token-weighted mean over every batch
        total = tokens = 0.0
        for batch in batches:
            count = float((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
        return total / tokens

    params = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    generator = torch.Generator().manual_seed(args.seed)
    directions = [filter_normalized_direction(params, generator) for _ in range(args.dims)]
    coordinates = torch.linspace(-args.radius, args.radius, args.grid).tolist()
    with tqdm(total=args.grid**args.dims, desc="loss landscape") as bar:
        losses = landscape_grid(loss, params, directions, coordinates, progress=bar.update)
    summary = sharpness(losses, coordinates)
    output = Path(args.output) if args.output else path / "analysis-landscape"
    report = {
        "adapter": str(folder),
        "base": base,
        "data": str(data),
        "examples": len(texts),
        "dims": args.dims,
        "seed": args.seed,
        "coordinates": coordinates,
        "losses": losses,
        "sharpness": summary,
    }
    with staged_directory(output, overwrite=True) as staging:
        (staging / "landscape.json").write_text(json.dumps(report, indent=1))
        draw_landscape(report, staging / "landscape.png")
    print(
        f"| adapter | center loss | mean rise at radius {summary['radius']:g} | max rise |\n|---|---:|---:|---:|\n"
        f"| {folder} | {summary['center_loss']:.4f} | {summary['mean_rise_at_radius']:.4f} | "
        f"{summary['max_rise']:.4f} |"
    )
    return output


def draw_landscape(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coordinates, losses = report["coordinates"], report["losses"]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if report["dims"] == 1:
        ax.plot(coordinates, losses, marker=".")
        ax.set_xlabel("alpha (filter-normalized direction)")
        ax.set_ylabel("loss")
    else:
        contour = ax.contourf(coordinates, coordinates, losses, levels=20, cmap="viridis")
        ax.contour(coordinates, coordinates, losses, levels=20, colors="white", linewidths=0.3)
        fig.colorbar(contour, ax=ax, label="loss")
        ax.set_xlabel("beta (direction 2)")
        ax.set_ylabel("alpha (direction 1)")
    ax.set_title(f"loss landscape: {Path(report['adapter']).parent.name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        output = run_spectrum(args) if args.command == "spectrum" else run_landscape(args)
    except (AnalysisError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written to {output}")
    return 0
