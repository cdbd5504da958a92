"""Evaluation: pass@1 over k samples, cons@k, unbiased pass@k, breakdowns, reports and `r1kit eval`.

    from r1kit.evaluation import evaluate_problems
    summary = evaluate_problems(engine, tokenizer, problems, k=4, pass_k=(1, 2, 4), out_dir=Path("eval"))

metrics.py: the estimators and `summarize` (pure); runner.py: sampling, grading and resume;
report.py: summary.json / summary.md / plots; cli.py: the `r1kit eval` command.
"""
from r1kit.evaluation.metrics import EvalSummary, SampleRecord, majority_vote, pass_at_k, summarize
from r1kit.evaluation.runner import evaluate_problems

__all__ = ["EvalSummary", "SampleRecord", "evaluate_problems", "majority_vote", "pass_at_k", "summarize"]
