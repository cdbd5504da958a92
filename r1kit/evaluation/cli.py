"""`r1kit eval`: evaluate a model on a named benchmark, a synthetic task's held-out split, or a JSONL file.

    r1kit eval --model runs/r1-zero/final --benchmark math500 --k 4 --pass-k 1,2,4 --by subject,level --out eval/
    r1kit eval --model runs/base-tiny --benchmark arithmetic --limit 100 --k 8
    r1kit eval --model M --data my.jsonl --problem-field question --answer-field answer --answer-style math
    r1kit eval --model M --benchmark humaneval --k 10 --pass-k 1,10
    r1kit eval --model M --data code.jsonl --answer-style code --tests-field tests

--benchmark takes any registered task name: the file benchmarks (math500, gsm8k, aime24; files found
under $R1KIT_DATA_DIR) and the synthetic tasks (arithmetic, countdown), which are evaluated on their
fixed held-out split. Prints the summary table; with --out, also writes samples.jsonl, summary.json,
summary.md and plots there, and an interrupted run started again with the same --out resumes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from r1kit.types import R1KitError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r1kit eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face causal-LM folder (e.g. an r1kit checkpoint)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--benchmark", help="math500, gsm8k, aime24, or a synthetic task (arithmetic, countdown)")
    src.add_argument("--data", type=Path, help="your own .jsonl/.parquet file of problems (all are evaluated)")
    ap.add_argument("--problem-field", default="problem", help="with --data: the question field")
    ap.add_argument("--answer-field", default="answer", help="with --data: the reference answer field")
    ap.add_argument("--id-field", default=None, help="with --data: a unique id field (default: the line number)")
    ap.add_argument("--answer-style", default="math", help="with --data: exact, numeric, math, countdown or code")
    ap.add_argument("--tests-field", default=None,
                    help="with --data and --answer-style code: the field holding each problem's tests")
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    ap.add_argument("--pass-k", type=_int_list, default=None,
                    help="k values for unbiased pass@k, each <= --k (default: 1, 2, 4, ... up to --k, and --k)")
    ap.add_argument("--by", type=_name_list, default=None,
                    help="metadata fields to break results down by, e.g. subject,level (default: every field with few values)")
    ap.add_argument("--template", default="r1_zero", help="prompt template name or a format string with {question}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-prompts", type=int, default=64, help="prompts per generation batch (x k rows)")
    ap.add_argument("--out", type=Path, default=None, help="folder for samples, summary and plots (resumable)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--backend", default="local", choices=["local", "vllm"], help="engine (vllm: the `vllm` extra)")
    return ap


def load_problems(args: argparse.Namespace) -> tuple[list, str]:
    """(problems, name) from --benchmark or --data, cut to --limit."""
    from r1kit.tasks import make_task

    if args.data is not None:
        meta = list(args.by or ())  # breakdown fields must be carried into Problem.meta
        task = make_task(
            "file", path=args.data, task_name=args.data.stem, problem_field=args.problem_field,
            answer_field=args.answer_field, id_field=args.id_field, answer_style=args.answer_style,
            tests_field=args.tests_field,
            meta_fields=meta, test_fraction=1.0,
        )
        name = str(args.data)
    else:
        if args.benchmark == "file":
            raise R1KitError("--benchmark file: use --data FILE (with --problem-field/--answer-field/--answer-style)")
        task = make_task(args.benchmark)
        name = args.benchmark
    problems = task.test_problems()
    if args.limit is not None:
        if args.limit < 1:
            raise R1KitError(f"--limit must be >= 1, got {args.limit}")
        problems = problems[: args.limit]
    if not problems:
        raise R1KitError(f"{name}: no problems to evaluate")
    return problems, name


def eos_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS and any the model's generation config adds
    (r1kit.policy.Policy.eos_token_ids, which every verb uses)."""
    from r1kit.policy import Policy

    return Policy.eos_ids_of(model, tokenizer)


def _print_summary(summary, name: str, seconds: float) -> None:
    from r1kit.evaluation.report import summary_markdown

    print(summary_markdown(summary).split("\n## ")[0].rstrip())
    for field, cells in summary.by.items():
        print(f"\nby {field}: " + ", ".join(f"{v} {100 * c['pass1']:.1f}%" for v, c in cells.items()))
    print(f"\n{name}: {summary.num_problems} problems x {summary.k} samples in {seconds:.1f} s")


def default_pass_k(k: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to k, and k itself: the points of the pass@k curve."""
    return tuple(sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k}))


def _model_name(path: str) -> str:
    """The model folder's absolute path (so `m` and `./m` resume the same run), or a hub name as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def run(args: argparse.Namespace) -> int:
    from r1kit.evaluation.runner import evaluate_problems
    from r1kit.policy import Policy, resolve_device

    problems, name = load_problems(args)
    try:
        device = resolve_device(args.device or "auto")  # a bad or absent device fails here, before loading
    except R1KitError as e:
        raise R1KitError(f"--device: {e}") from None
    policy = Policy.load(args.model, device=device, dtype=args.dtype)
    tokenizer, engine = policy.tokenizer, policy.make_engine(args.backend)
    start = time.perf_counter()
    summary = evaluate_problems(
        engine, tokenizer, problems, k=args.k, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, template=args.template, seed=args.seed,
        batch_prompts=args.batch_prompts, pass_k=args.pass_k if args.pass_k is not None else default_pass_k(args.k),
        progress=not args.quiet, out_dir=args.out, by=args.by, label=f"{name} | {_model_name(args.model)}",
    )
    _print_summary(summary, name, time.perf_counter() - start)
    if args.out is not None:
        print(f"wrote {args.out}/samples.jsonl, summary.json, summary.md and plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `r1kit eval`; returns the exit status (2 for a user error, printed to stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except R1KitError as e:
        print(f"r1kit eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
