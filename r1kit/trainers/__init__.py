"""Training loops: one loop per job, orchestration only (the maths lives in r1kit.algorithms)."""
