"""Evaluation: lm-evaluation-harness on a run's adapter or merged model, the offline task wrappers (``tasks/``,
package data) and MT-Bench: answers (``mt_bench``), judged at an OpenAI-compatible endpoint (``judge``,
``judge_results``) with FastChat's prompts (``fastchat_data``).

    python -m lora_over_trl.eval OUTPUT_DIR --tasks gsm8k,humaneval --confirm_run_unsafe_code
"""

from lora_over_trl.eval.command import TASKS_DIR, main, make_parser, run

__all__ = ["TASKS_DIR", "main", "make_parser", "run"]
