"""Model configs: the bundled ones load, and every malformed one fails with file:line and a useful hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcli.config import bundled_config_names, find_config, load_config, parse_config
from sdcli.errors import ConfigError

BUNDLED = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["sd15", "sd21-v", "sd21-base"])
def test_bundled_configs_load(name):
    config = load_config(name)
    assert config.name == name
    assert config.source == BUNDLED / f"{name}.yaml"
    assert config.vae.downsample == 8


def test_bundled_sd_facts():
    """The numbers DESIGN.md states for each family."""
    sd15, sd21 = load_config("sd15"), load_config("sd21-v")
    (t15,), (t21,) = sd15.text, sd21.text
    assert (t15.width, t15.layers, t15.pad_id, t15.output_layer) == (768, 12, 49407, "last")
    assert (t21.width, t21.layers, t21.pad_id, t21.output_layer) == (1024, 24, 0, "penultimate")
    assert [sd15.unet.heads_at(320 * m) for m in (1, 2, 4)] == [8, 8, 8]
    assert [sd21.unet.heads_at(320 * m) for m in (1, 2, 4)] == [5, 10, 20]
    assert sd21.schedule.prediction_type == "v_prediction"
    assert load_config("sd21-base").schedule.prediction_type == "epsilon"


def test_bundled_names_listed():
    assert {"sd15", "sd21-v", "sd21-base"} <= set(bundled_config_names())


def _yaml(**replace: str) -> str:
    text = (BUNDLED / "sd15.yaml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source=Path("model.yaml"))
    return str(info.value)


def test_unknown_key_suggests_the_near_one():
    message = _error(_yaml(**{"  num_res_blocks: 2": "  num_res_block: 2"}))
    assert message.startswith("model.yaml:")
    assert "unknown key 'unet.num_res_block'" in message
    assert "did you mean 'num_res_blocks'" in message


def test_error_names_the_line():
    text = _yaml(**{"  heads: 12": "  heads: twelve"})
    line = text.splitlines().index("  heads: twelve") + 1
    assert _error(text).startswith(f"model.yaml:{line}: 'text.heads' must be an integer")


def test_bad_enum_lists_choices():
    message = _error(_yaml(**{"activation: quick_gelu": "activation: quickgelu"}))
    assert "did you mean 'quick_gelu'" in message and "expected one of quick_gelu, gelu" in message


def test_missing_key():
    assert "missing key 'unet.context_dim'" in _error(_yaml(**{"  context_dim: 768\n": ""}))


def test_unknown_default_sampler():
    assert "did you mean 'euler_a'" in _error(_yaml(**{"sampler: dpmpp_2m_karras": "sampler: euler-a"}))


def test_heads_and_head_dim_are_exclusive():
    both = _yaml(**{"  num_heads: 8": "  num_heads: 8\n  head_dim: 64"})
    assert "exactly one of num_heads and head_dim" in _error(both)


def test_attention_level_outside_the_unet():
    outside = _yaml(**{"attention_levels: [0, 1, 2]": "attention_levels: [0, 7]"})
    assert "attention_levels' has level 7" in _error(outside)


def test_negative_number_rejected():
    assert "'defaults.steps' must not be negative" in _error(_yaml(**{"steps: 25": "steps: -3"}))


@pytest.mark.parametrize("text", ["", "just a string", "[1, 2]", "name: [unclosed", "a: b\n  c: d"])
def test_malformed_yaml_is_a_clean_error(text):
    assert _error(text).startswith("model.yaml")


def test_unknown_config_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sd15'"):
        find_config("sd1.5x")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_user_config_dir_shadows_nothing_but_is_found(sdcli_home):
    folder = sdcli_home / "configs"
    folder.mkdir()
    (folder / "mine.yaml").write_text(_yaml(**{"name: sd15": "name: mine"}))
    assert load_config("mine").name == "mine"


def test_weights_resolution_order(tmp_path, monkeypatch):
    config = load_config("sd15")
    monkeypatch.chdir(tmp_path)
    assert config.resolve_weights() == tmp_path / config.weights  # nothing exists: reported where expected
    store = tmp_path / "store"
    (store / "weights").mkdir(parents=True)
    (store / config.weights).write_bytes(b"")
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(store))
    assert config.resolve_weights() == store / config.weights
    assert config.resolve_weights("/abs/file.safetensors") == Path("/abs/file.safetensors")


def test_config_finds_the_weights_folder_beside_its_configs_folder(tmp_path, monkeypatch):
    """As a bundled config in configs/ finds the repository's weights/ from any working directory."""
    (tmp_path / "repo" / "configs").mkdir(parents=True)
    (tmp_path / "repo" / "weights").mkdir()
    (tmp_path / "repo" / "weights" / "w.safetensors").write_bytes(b"")
    source = tmp_path / "repo" / "configs" / "m.yaml"
    source.write_text(_yaml(**{"weights/v1-5-pruned-emaonly.safetensors": "weights/w.safetensors"}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_config(str(source)).resolve_weights() == tmp_path / "repo" / "weights" / "w.safetensors"


def test_weights_dir_holds_files_by_name(tmp_path, monkeypatch):
    config = load_config("sd15")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / Path(config.weights).name).write_bytes(b"")
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(tmp_path / "flat"))
    assert config.resolve_weights() == tmp_path / "flat" / Path(config.weights).name
