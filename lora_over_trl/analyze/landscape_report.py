"""``analyze landscape``: the held-out loss around a trained adapter along random filter-normalized directions,
as ``landscape.json`` and ``landscape.png`` (the math is :mod:`lora_over_trl.analyze.landscape`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lora_over_trl.analyze.adapters import AnalysisError, BaseWeights, adapter_folder
from lora_over_trl.utils.errors import one_line

__all__ = ["run_landscape"]


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
    from lora_over_trl.eval.backends import load_transformers
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
        BaseWeights.from_hub_cache(base)  # a clear error when the base is nowhere
    loading = {"device": args.device, "dtype": "float32", "load_in_4bit": args.load_in_4bit}
    try:
        model, tokenizer = load_transformers(base, folder, **loading)
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
