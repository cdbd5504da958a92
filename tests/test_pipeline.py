"""The R1 pipeline: lineage, skip-when-done, resume after interruptions = an uninterrupted run, and
bad input stopping the pipeline with the stage and cause named. Micro config: tiny models, few steps."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from r1kit.config import RunConfig, from_dict
from r1kit.recipes import r1
from r1kit.trainers import sft as sft_mod
from r1kit.types import R1KitError

MICRO = {
    "name": "micro", "seed": 0, "threads": 1,  # 1 thread: the test machine's cores are shared
    "model": {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64,
              "vocab_size": 300, "max_position_embeddings": 192},
    "task": {"name": "arithmetic", "options": {"min_digits": 1, "max_digits": 1, "num_test": 20}},
    "pretrain": {"corpus_docs": 400, "direct_frac": 0.5, "reflect_frac": 0.1, "steps": 200, "batch_size": 16,
                 "lr": 3e-3, "warmup_steps": 5},
    "grpo": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 64},
    "eval": {"num_problems": 6, "k": 2, "max_new_tokens": 64},
    "log": {"progress": False, "tensorboard": False, "sample_every": 0, "save_every": 1},
    "sft": {"epochs": 3, "lr": 3e-3, "seq_len": 128, "micro_batch_size": 8, "cold_start_examples": 150, "save_every": 25},
    "sample": {"num_prompts": 16, "samples_per_prompt": 4, "max_new_tokens": 64, "min_tokens": 1, "max_tokens": 64,
               "general_frac": 0.2},
    "rm": {"pairs": 24, "epochs": 1, "batch_size": 8},
    "distill": {"student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 32,
                            "max_position_embeddings": 192},
                "student_pretrain_steps": 10, "num_prompts": 16, "rl_steps": 2},
    "pipeline": {"corpus_zh_frac": 0.3, "corpus_mix_frac": 0.2, "general_test": 3,
                 "overrides": {"distill": {"sft": {"save_every": 1}}}},
}


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """Stages set torch's thread count from the config; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def micro(root: Path, **top) -> RunConfig:
    return from_dict(RunConfig, {**MICRO, "output_dir": str(root), **top})


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The micro base model, pretrained once and shared (every run below starts from it)."""
    root = tmp_path_factory.mktemp("base")
    rec = r1.run_stage(micro(root), "base", log=lambda s: None)
    return root / "micro" / rec["model"]


def pipeline_cfg(root: Path, base: Path) -> RunConfig:
    cfg = micro(root)
    # The distillation teacher is the reasoning-RL model here: a micro rl_all is too weak to pass the filters.
    return replace(cfg, model=replace(cfg.model, path=str(base)),
                   distill=replace(cfg.distill, teacher=str(root / "micro" / "reason_rl" / "model")))


VOLATILE = {"peak_memory_mb", "seconds", "seconds_this_run", "budget_s", "finished", "resumed_from", "path", "given", "teacher",
            "source_model", "explicit_inputs", "init"}


def stable(x):
    """A done.json record without wall times and absolute paths (what may differ between two runs)."""
    if isinstance(x, dict):
        return {k: stable(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [stable(v) for v in x]
    return x


def weights_digest(model_dir: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def outputs(root: Path) -> dict[str, dict]:
    out = {}
    for stage in r1.PIPELINE_STAGES:
        rec = json.loads((root / "micro" / stage / "done.json").read_text())
        out[stage] = stable(rec)
        if "model" in rec and (root / "micro" / rec["model"] / "model.safetensors").exists():
            out[stage]["weights"] = weights_digest(root / "micro" / rec["model"])
    return out


def test_resume_after_interruptions_matches_uninterrupted_run(tmp_path, base_model, monkeypatch):
    quiet = lambda s: None  # noqa: E731
    full = r1.run_pipeline(pipeline_cfg(tmp_path / "a", base_model), log=quiet)
    assert set(full) == set(r1.PIPELINE_STAGES)
    rec = full["sft"]
    assert rec["parents"]["base"]["identity"] == full["base"]["identity"]
    assert rec["inputs"][0]["sha256"] == hashlib.sha256((tmp_path / "a/micro/sample/data.jsonl").read_bytes()).hexdigest()
    assert 0 <= rec["eval"]["pass1"] <= 1 and "mixing_rate" in rec["eval"]
    assert "| R1 stage 4" in (tmp_path / "a/micro/pipeline.md").read_text()

    cfg_b = pipeline_cfg(tmp_path / "b", base_model)
    # 1) an exception at the start of stage `rm`: the stages before it are done, rm is not.
    real_rm = r1.STAGES["rm"]

    def broken_rm(ctx):
        raise RuntimeError("simulated crash")

    monkeypatch.setitem(r1.STAGES, "rm", replace(real_rm, fn=broken_rm))
    with pytest.raises(RuntimeError):
        r1.run_pipeline(cfg_b, log=quiet)
    assert (tmp_path / "b/micro/sft/done.json").exists() and not (tmp_path / "b/micro/rm/done.json").exists()
    monkeypatch.setitem(r1.STAGES, "rm", real_rm)

    # 2) a kill in the middle of the student's SFT, after a checkpoint: it resumes from that checkpoint.
    real_step, calls = sft_mod.sft_step, {"n": 0}

    def killed_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*a, **k)

    seen: list[str] = []
    monkeypatch.setattr(sft_mod, "sft_step", killed_step)
    with pytest.raises(KeyboardInterrupt):
        r1.run_pipeline(cfg_b, log=seen.append)
    assert "[sft] done already, skipped" in seen and "[rm] running" in seen and "[distill] running" in seen
    monkeypatch.setattr(sft_mod, "sft_step", real_step)
    assert list((tmp_path / "b/micro/distill/checkpoints").glob("step-*"))

    resumed = r1.run_pipeline(cfg_b, log=quiet)
    assert resumed["distill"]["sft"]["resumed_from"] > 0
    assert outputs(tmp_path / "b") == outputs(tmp_path / "a")

    # 3) a finished pipeline reruns as a no-op; a changed stage config is refused, not silently mixed.
    seen.clear()
    r1.run_pipeline(cfg_b, log=seen.append)
    assert all(s.endswith("skipped") for s in seen)
    changed = replace(cfg_b, rm=replace(cfg_b.rm, epochs=2))
    with pytest.raises(R1KitError, match="stage 'rm' .* another config"):
        r1.run_pipeline(changed, log=quiet)


def test_bad_input_stops_the_pipeline_naming_stage_and_cause(tmp_path, base_model):
    quiet = lambda s: None  # noqa: E731
    cfg = pipeline_cfg(tmp_path, base_model)
    with pytest.raises(R1KitError, match=r"stage 'sft': its input stage 'base' is not finished"):
        r1.run_stage(cfg, "sft", log=quiet)
    strict = replace(cfg, sample=replace(cfg.sample, max_tokens=2, min_tokens=1, model=str(base_model)),
                     pipeline=replace(cfg.pipeline, stages=["base", "sample", "sft"]))
    with pytest.raises(R1KitError, match=r"stage 'sample': no sampled completion passed the filters .*too long: \d+"):
        r1.run_pipeline(strict, log=quiet)
    assert not (tmp_path / "micro/sample/done.json").exists() and not (tmp_path / "micro/sft").exists()
    with pytest.raises(R1KitError, match="pipeline.stages: unknown stages"):
        r1.run_pipeline(replace(cfg, pipeline=replace(cfg.pipeline, stages=["base", "nope"])), log=quiet)


def test_late_stage_settings_are_checked_before_the_first_stage(tmp_path):
    """A bad value for rm, sample or an SFT gate stops the pipeline before stage 0 writes anything."""
    quiet = lambda s: None  # noqa: E731
    for over, match in (({"rm": {"kind_weights": {"typo": 1}}}, "rm.kind_weights"),
                        ({"rm": {"kind_weights": {"wrong_value": 0, "malformed": 0, "repeated": 0}}}, "rm.kind_weights"),
                        ({"rm": {"policy_prompts": -1}}, "rm.policy_prompts"),
                        ({"rm": {"policy_prompts": 8, "policy_samples": 0}}, "rm.policy_samples"),
                        ({"rm": {"policy_prompts": 8, "policy_temperature": 0.0}}, "rm.policy_temperature"),
                        ({"sample": {"max_per_prompt": 0}}, "sample.max_per_prompt"),
                        ({"pipeline": {"sft_max_attempts": 0}}, "pipeline.sft_max_attempts"),
                        ({"pipeline": {"overrides": {"distill": {"sample": {"num_prompts": 0}}}}}, "sample.num_prompts")):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        cfg = from_dict(RunConfig, {**MICRO, "output_dir": str(root), **{k: {**MICRO.get(k, {}), **v} for k, v in over.items()}})
        with pytest.raises(R1KitError, match=match):
            r1.run_pipeline(cfg, log=quiet)
        assert not root.exists()
    # rm.data given: the synthetic pairs' kinds are not used, so not checked
    cfg = from_dict(RunConfig, {**MICRO, "rm": {**MICRO["rm"], "kind_weights": {"typo": 1}, "data": "x.jsonl"}})
    r1.check_stage_settings(cfg)


def test_stage_overrides_are_type_checked_and_scoped(tmp_path):
    cfg = from_dict(RunConfig, {**MICRO, "pipeline": {"overrides": {"cold_sft": {"sft": {"epochs": 7}}}}})
    assert r1.stage_config(cfg, "cold_sft").sft.epochs == 7 and r1.stage_config(cfg, "sft").sft.epochs == 3
    bad = from_dict(RunConfig, {**MICRO, "pipeline": {"overrides": {"cold_sft": {"sft": {"epochs": "x"}}}}})
    with pytest.raises(R1KitError, match=r"pipeline.overrides.cold_sft: .*'sft.epochs'"):
        r1.stage_config(bad, "cold_sft")
    with pytest.raises(R1KitError, match="unknown stages"):
        r1.stage_config(from_dict(RunConfig, {**MICRO, "pipeline": {"overrides": {"nope": {}}}}), "sft")


def test_rl_task_stamps_language_and_hides_general_answers():
    import random

    from r1kit.recipes.sampling import GeneralTask
    from r1kit.tasks import make_task

    task = r1.RLTask(make_task("arithmetic", min_digits=1, max_digits=1, num_test=5), "zh", GeneralTask(num_test=2), 0.25)
    probs = task.train_problems(8, random.Random(0))
    general = [p for p in probs if p.meta.get("scenario") == "general"]
    assert len(general) == 2 and all(p.answer == "" and p.meta["reference"] for p in general)
    assert all(p.meta["lang"] == "zh" for p in probs) and all(p.meta["lang"] == "zh" for p in task.test_problems())


def test_gate_settings_enter_a_stage_identity_only_when_the_gate_is_on():
    stage = r1.STAGES["base"]
    cfg = RunConfig()
    ident = r1.stage_identity(cfg, stage, {}, {})
    moved = replace(cfg, pretrain=replace(cfg.pretrain, max_steps=9999, extend_steps=7))
    assert r1.stage_identity(moved, stage, {}, {}) == ident  # dormant while gate_pass1 = 0
    gated = replace(cfg, pretrain=replace(cfg.pretrain, gate_pass1=0.2))
    assert r1.stage_identity(gated, stage, {}, {}) != ident
    gated_moved = replace(gated, pretrain=replace(gated.pretrain, max_steps=9999))
    assert r1.stage_identity(gated_moved, stage, {}, {}) != r1.stage_identity(gated, stage, {}, {})
    other = replace(cfg, pretrain=replace(cfg.pretrain, steps=cfg.pretrain.steps + 1))
    assert r1.stage_identity(other, stage, {}, {}) != ident


def test_reward_model_pairs_from_the_policys_own_wrong_answers(tmp_path, base_model):
    """rm.policy_prompts: the SFT model (here the micro base, which has never seen a general prompt, so
    every answer is wrong) answers general training prompts; each distinct wrong answer is rejected against
    the right one, beside the synthetic pairs."""
    from r1kit.recipes.sampling import general_completion
    from r1kit.trainers.reward_model import read_preference_pairs

    cfg = micro(tmp_path, rm={**MICRO["rm"], "init": str(base_model), "policy_prompts": 6, "policy_samples": 3})
    rec = r1.run_stage(cfg, "rm", log=lambda s: None)
    stats = rec["policy_pairs"]
    assert stats["prompts"] == 6 and stats["samples"] == 18 and stats["right"] == 0 and 6 <= stats["pairs"] <= 18
    pairs = read_preference_pairs(tmp_path / "micro" / "rm" / "prefs.jsonl")
    own = [p for p in pairs if p.kind == "policy_wrong"]
    assert len(pairs) == 24 + stats["pairs"] and len(own) == stats["pairs"]
    assert len({(p.prompt, " ".join(p.rejected.split())) for p in own}) == len(own)  # distinct per prompt
    for p in own:
        number = p.prompt.split("Repeat ")[1].split("\n")[0]
        assert p.chosen == general_completion(type("P", (), {"answer": number})()) and p.rejected != p.chosen
    # the default (0) writes synthetic pairs only, with the identity stages had before the setting existed
    plain = micro(tmp_path / "plain", rm={**MICRO["rm"], "init": str(base_model)})
    changed = replace(plain, rm=replace(plain.rm, policy_samples=5, policy_temperature=0.7))
    stage = r1.STAGES["rm"]
    assert r1.stage_identity(plain, stage, {}, {}) == r1.stage_identity(changed, stage, {}, {})
    assert r1.stage_identity(plain, stage, {}, {}) != r1.stage_identity(cfg, stage, {}, {})


def test_general_documents_in_the_base_corpus(tmp_path):
    """pipeline.corpus_general_frac adds "Repeat N" documents (training prompts only, answered directly) to
    stage 0's corpus; at 0 the stages keep the identities they had before the setting existed."""
    import random

    from r1kit.recipes.sampling import GeneralTask, general_docs

    docs = general_docs(50, "r1_zero", random.Random(0))
    held = {p.question for p in GeneralTask().test_problems()}
    assert len(docs) == 50 and {d.style for d in docs} == {"general"}
    for d in docs:
        question = d.prompt.split("User: ")[1].split("\n")[0]
        assert question.startswith("Repeat ") and question not in held
        assert d.completion == f" <think></think> <answer> {question.removeprefix('Repeat ')} </answer>"
    with pytest.raises(R1KitError, match="corpus_general_frac"):
        general_docs(-1, "r1_zero", random.Random(0))
    cfg = RunConfig()
    on = replace(cfg, pipeline=replace(cfg.pipeline, corpus_general_frac=0.1))
    for name in ("base", "student_base", "rl_all"):
        stage = r1.STAGES[name]
        without = replace(stage, keys=tuple(k for k in stage.keys if k != "pipeline.corpus_general_frac"))
        if name != "rl_all":  # rl_all hashes the whole pipeline section, where the key is dormant at 0
            assert r1.stage_identity(cfg, stage, {}, {}) == r1.stage_identity(cfg, without, {}, {})
        assert r1.stage_identity(on, stage, {}, {}) != r1.stage_identity(cfg, stage, {}, {})
    assert "corpus_general_frac" not in r1._hashed_value("pipeline", dataclasses.asdict(cfg.pipeline))
    rec = r1.run_stage(micro(tmp_path, pretrain={**MICRO["pretrain"], "steps": 3},
                             pipeline={**MICRO["pipeline"], "corpus_general_frac": 0.25}), "base", log=lambda s: None)
    styles = rec["pretrain"]["styles"]
    assert styles["general"] == 100 and sum(styles.values()) == rec["pretrain"]["docs"] == 500



def test_general_prompts_of_a_chosen_length(tmp_path):
    """pipeline.general_digits sets the numbers' digits of every general prompt (training, reward-model pairs,
    evaluation); the held-out prompts stay out of training; a bad value is named before stage 0; at the old
    default [3, 5] every stage keeps its identity, and another value changes the identity of the stages that
    read general prompts."""
    import random

    from r1kit.recipes.sampling import general_task

    cfg = RunConfig()
    three = replace(cfg, pipeline=replace(cfg.pipeline, general_digits=[3, 3]))
    task = general_task(three)
    test = task.test_problems()
    assert len(test) == cfg.pipeline.general_test == len({p.question for p in test})
    train = task.train_problems(500, random.Random(0))
    assert all(len(p.answer) == 3 and p.question == f"Repeat {p.answer}" for p in train + test)
    assert not {p.question for p in train} & {p.question for p in test}
    assert {len(p.answer) for p in general_task(cfg).train_problems(300, random.Random(0))} == {3, 4, 5}
    assert [p.question for p in general_task(three, num_test=10).test_problems()] == [p.question for p in test[:10]]
    for bad in ([3], [4, 3], [0, 2], [3, 10], ["3", 3]):
        with pytest.raises(R1KitError, match="pipeline.general_digits must be"):
            general_task(replace(cfg, pipeline=replace(cfg.pipeline, general_digits=bad)))
    with pytest.raises(R1KitError, match="too few numbers for 50 held-out general prompts"):
        general_task(replace(cfg, pipeline=replace(cfg.pipeline, general_digits=[1, 2])))
    root = tmp_path / "bad"
    bad = from_dict(RunConfig, {**MICRO, "output_dir": str(root), "pipeline": {**MICRO.get("pipeline", {}), "general_digits": [6, 2]}})
    with pytest.raises(R1KitError, match="general_digits"):
        r1.run_pipeline(bad, log=lambda s: None)
    assert not root.exists()
    for name in ("base", "zero", "sample", "rm", "rl_all", "distill"):
        stage = r1.STAGES[name]
        without = replace(stage, keys=tuple(k for k in stage.keys if k != "pipeline.general_digits"))
        if name != "rl_all":  # rl_all hashes the whole pipeline section, where [3, 5] is left out too
            assert r1.stage_identity(cfg, stage, {}, {}) == r1.stage_identity(cfg, without, {}, {})
        assert r1.stage_identity(three, stage, {}, {}) != r1.stage_identity(cfg, stage, {}, {})


def test_every_pipeline_stage_is_registered():
    from r1kit.config import PIPELINE_STAGES

    assert list(r1.STAGES) == PIPELINE_STAGES
