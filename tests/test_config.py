import pytest

from r1kit.config import GRPOConfig, RunConfig, from_dict, load_config, save_config, load_yaml
from r1kit.cli import config_path
from r1kit.types import R1KitError


def test_defaults_yaml_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 5\ngrpo:\n  lr: 3e-4\n  steps: 7\n")
    cfg = load_config(RunConfig, f, ["grpo.steps=9", "grpo.clip_ratio_c=3", "task.options={min_digits: 2}"])
    assert cfg.seed == 5 and cfg.grpo.lr == pytest.approx(3e-4)  # YAML 1.1 "3e-4" string coerced
    assert cfg.grpo.steps == 9 and cfg.grpo.clip_ratio_c == 3.0 and cfg.task.options == {"min_digits": 2}
    assert cfg.grpo.group_size == GRPOConfig().group_size


def test_a_dotted_override_into_a_mapping_keeps_its_other_keys(tmp_path):
    cfg = load_config(RunConfig, None, ["grpo.reward_weights.format=0.2", "task.options.max_digits=4"])
    assert cfg.grpo.reward_weights == {"accuracy": 1.0, "format": 0.2}  # accuracy kept from the default
    assert cfg.task.options == {"min_digits": 3, "max_digits": 4}
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  reward_weights: {accuracy: 1.0}\n")  # a whole mapping in a file replaces the default
    cfg = load_config(RunConfig, f, ["grpo.reward_weights.language=0.5"])
    assert cfg.grpo.reward_weights == {"accuracy": 1.0, "language": 0.5}
    cfg = load_config(RunConfig, None, ["grpo.preset=dapo", "grpo.reward_weights.format=0.3"])
    assert cfg.grpo.reward_weights["format"] == 0.3 and cfg.grpo.reward_weights["accuracy"] == 1.0


@pytest.mark.parametrize("override, fragment", [
    (["grpo.lrr=1"], "unknown config key 'grpo.lrr'"),
    (["nosuch=1"], "unknown config key 'nosuch'"),
    (["grpo.steps=abc"], "'grpo.steps': expected int"),
    (["grpo.steps=1.5"], "'grpo.steps': expected int"),
    (["log.progress=maybe"], "'log.progress': expected bool"),
    (["grpo.reward_weights.accuracy=x"], "'grpo.reward_weights.accuracy'"),
    (["grpo=3"], "config section 'grpo': expected a mapping"),
    (["seed"], "not of the form key=value"),
    (["=3"], "empty key"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(R1KitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(RunConfig, None, override)


def test_bad_files(tmp_path):
    with pytest.raises(R1KitError, match="not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [unclosed\n")
    with pytest.raises(R1KitError, match="not valid YAML"):
        load_config(RunConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(R1KitError, match="mapping at the top level"):
        load_config(RunConfig, lst)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, config_path("zero-tiny"), ["grpo.beta=0.04"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(RunConfig, load_yaml(tmp_path / "config.yaml"))
    assert again == cfg


def test_embedded_config_is_found_and_unknown_name_is_an_error():
    assert config_path(None).name == "zero-tiny.yaml"
    with pytest.raises(R1KitError, match="embedded config"):
        config_path("no-such-config")
