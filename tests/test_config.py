"""The config schema: the shipped configs load, and bad values are refused with the field named."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from contract.result_file import config_hash
from contract.config import ConfigError, load_config, parse_config
from contract.layout import CONFIG_DIR

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    cfg = load_config(name)
    assert cfg.name == name


def test_real_job_configs_carry_the_seed_hyperparameters():
    for name, scheme in (("int8", "int8"), ("int4", "int4")):
        cfg = load_config(name)
        assert cfg.model.name_or_path == "bofenghuang/whisper-large-v3-distil-fr-v0.2"
        assert (cfg.data.dataset, cfg.data.config, cfg.data.text_column) == ("facebook/multilingual_librispeech", "french", "transcript")
        assert (cfg.train.epochs, cfg.train.learning_rate, cfg.data.max_samples) == (5, 5e-6, 60000)
        # the seed's 32 samples per optimizer step; the micro-batch is what the GPU measurements favour
        assert cfg.train.per_device_batch_size * cfg.train.grad_accum == 32
        assert cfg.train.per_device_batch_size == {"int8": 8, "int4": 16}[scheme]
        assert cfg.quant.scheme == scheme
    assert load_config("int4").quant.group_size == 32


@pytest.mark.parametrize("override, field, hint", [
    ({"quant.scheme": "int3"}, "quant.scheme", "'int8' or 'int4'"),
    ({"train.per_device_batch_size": -8}, "train.per_device_batch_size", "greater than 0"),
    ({"data.text_column": " "}, "data", "text_column"),
    ({"data.manifest": "fixtures/nope.jsonl"}, "data", "does not exist"),
    ({"machine.backend": "aws"}, "machine.backend", "'vast', 'local' or 'ssh'"),
    ({"train.learning_rate": 0}, "train.learning_rate", "greater than 0"),
    ({"train.lr": 1e-5}, "train.lr", "Extra inputs are not permitted"),
])
def test_bad_values_are_refused_naming_the_field(override, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    assert field in str(e.value) and hint in str(e.value)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="not found.*demo"):
        load_config("nonexistent")


def test_step_hashes_depend_only_on_their_sections():
    a = load_config("tiny")
    b = load_config("tiny", {"bench.max_clips": 3, "machine.max_cost_usd": 2})
    c = load_config("tiny", {"train.learning_rate": 0.5})
    assert config_hash(a, "train") == config_hash(b, "train")
    assert config_hash(a, "bench") != config_hash(b, "bench")
    assert config_hash(a, "prepare") == config_hash(c, "prepare")
    assert config_hash(a, "train") != config_hash(c, "train")


INT_FIELDS = ["train.per_device_batch_size", "train.grad_accum", "train.eval_every", "train.save_every",
              "data.max_samples", "bench.max_clips", "quant.group_size", "eval.bootstrap_samples"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(INT_FIELDS),
       value=st.one_of(st.integers(max_value=0), st.text(max_size=5).filter(lambda s: not s.strip().lstrip("-").isdigit()),
                       st.none(), st.lists(st.integers(), max_size=2)))
def test_property_invalid_numbers_are_refused_with_the_field_named(field, value):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", {field: value})
    assert field in str(e.value)


@settings(max_examples=40, deadline=None)
@given(scheme=st.text(min_size=1, max_size=8).filter(lambda s: s not in ("int8", "int4")))
def test_property_unknown_quantization_is_refused(scheme):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", {"quant.scheme": scheme})
    assert "quant.scheme" in str(e.value) and "int8" in str(e.value)


@settings(max_examples=40, deadline=None)
@given(raw=st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=4), max_size=4))
def test_property_garbage_documents_never_pass_or_crash(raw):
    with pytest.raises(ConfigError):
        parse_config(raw)


# ---------------------------------------------------------------- inf / nan, Hub repo ids

def _float_fields() -> list[str]:
    """Every float field of the schema, dotted (machine.max_cost_usd, train.epochs, ...)."""
    from contract.finite_numbers import float_fields

    return [path for path, _ in float_fields(load_config("tiny"))] + ["machine.vast.bid_dph"]


def test_every_float_field_is_found():
    fields = _float_fields()
    assert {"machine.max_cost_usd", "train.epochs", "eval.max_wer_degradation", "machine.vast.max_dph",
            "data.max_seconds", "train.learning_rate", "machine.planned_hours"} <= set(fields)
    assert "train.seed" not in fields and "machine.vast.num_gpus" not in fields


@pytest.mark.parametrize("field", _float_fields())
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "NaN", " -Infinity ", "1e999", 10**400])
def test_inf_and_nan_are_refused_for_every_float_field(field, value):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", {field: value})
    assert f"{field}: must be a finite number" in str(e.value)


def test_inf_is_refused_even_past_load_config():
    from contract.config import RunConfig

    raw = load_config("tiny").model_dump()
    raw["machine"]["max_cost_usd"] = float("inf")
    with pytest.raises(ValueError, match="machine.max_cost_usd must be a finite number"):
        RunConfig.model_validate(raw)


def test_finite_floats_and_non_float_fields_are_untouched():
    cfg = load_config("tiny", {"machine.max_cost_usd": "12.5", "train.epochs": 1e-3, "name": "nan", "hub.license": "inf"})
    assert (cfg.machine.max_cost_usd, cfg.train.epochs, cfg.name, cfg.hub.license) == (12.5, 1e-3, "nan", "inf")


@pytest.mark.parametrize("repo_id", ["alice/whisper-qat", "A_b.c/x.y_z-1", "a/b", "alice/" + "x" * 96, "0/_x_",
                                     "your-hf-user/whisper-large-v3-distil-fr-qat-int8"])
def test_good_repo_ids_load(repo_id):
    assert load_config("tiny", {"hub.repo_id": repo_id}).hub.repo_id == repo_id


@pytest.mark.parametrize("repo_id, words", [
    ("alice", "'owner/name'"), ("alice/", "'owner/name'"), ("/m", "'owner/name'"), ("a/b/c", "'owner/name'"),
    ("alice/m--x", "no '--'"), ("alice/m..x", "name 'm..x'"), ("al--ice/m", "owner 'al--ice'"),
    ("alice/-m", "not starting or ending"), ("alice/m-", "not starting or ending"), ("alice/.m", "name '.m'"),
    ("alice/m.", "name 'm.'"), (".alice/m", "owner '.alice'"), ("alice/" + "x" * 97, "at most 96"),
    ("alice/m x", "letters, digits"), ("alice/é", "letters, digits"), ("alice/m\n", "letters, digits"),
    ("alice/m;rm -rf", "letters, digits"), ("alice/..", "name '..'"), ("alice/m/", "'owner/name'"),
])
def test_bad_repo_ids_are_refused_at_load_config(repo_id, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", {"hub.repo_id": repo_id})
    assert "hub.repo_id" in str(e.value) and words in str(e.value)


# ---------------------------------------------------------------- accepted, then failing or misleading after renting
# (issue 19 finding 14): each refused before anything is rented, the field named.

def _refused(overrides: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert all(w in str(e.value) for w in words), str(e.value)
    return str(e.value)


def test_a_relative_model_name_that_is_a_folder_here_is_refused(tmp_path, monkeypatch):
    (tmp_path / "me" / "my-whisper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    _refused({"model.name_or_path": "me/my-whisper"}, "model.name_or_path", "is a folder here", "absolute path")
    _refused({"model.name_or_path": "fixtures/french"}, "model.name_or_path", "is a folder here")  # in the repository
    for name in ("./me/not-there", "../x", "a/b/c", "me/my whisper"):
        _refused({"model.name_or_path": name}, "model.name_or_path", "neither a Hub id")
    for hub_id in ("openai/whisper-base", "bofenghuang/whisper-large-v3-distil-fr-v0.2", "gpt2", "fixture:tiny-random"):
        assert load_config("tiny", {"model.name_or_path": hub_id}).model.name_or_path == hub_id


def test_an_absolute_model_folder_needs_a_machine_that_sees_it(tmp_path):
    _refused({"model.name_or_path": str(tmp_path)}, "model.name_or_path", "not pushed to a rented machine")
    assert load_config("tiny", {"model.name_or_path": str(tmp_path), "machine.backend": "local"})


def test_the_test_split_is_never_the_train_split():
    _refused({"data.test_split": "train"}, "data.test_split 'train' is the train split")
    _refused({"data.train_split": "all", "data.test_split": "all"}, "data.test_split 'all' is the train split")


@pytest.mark.parametrize("language", ['fr", task="translate"); import os; os.system("id"); ("', "fr\n", "klingon",
                                      "French", "<|fr|>", ""])
def test_model_language_is_one_whisper_knows(language):
    _refused({"model.language": language}, "model.language", "not a language Whisper knows")


@pytest.mark.parametrize("language", ["fr", "french", "en", "haitian creole", "yue", "castilian"])
def test_whisper_languages_by_code_or_name_load(language):
    assert load_config("tiny", {"model.language": language}).model.language == language


def test_the_language_list_is_transformers_own():
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    from contract.whisper_languages import CODES, NAMES

    assert CODES == set(LANGUAGES) and NAMES == set(TO_LANGUAGE_CODE)


@pytest.mark.parametrize("field, value", [
    ("train.epochs", 1e300), ("train.max_steps", 10**12), ("machine.vast.create_attempts", 10**9),
    ("data.max_samples", 10**18), ("data.max_eval_samples", 10**12), ("bench.threads", 10**6),
    ("bench.max_new_tokens", 449), ("eval.max_new_tokens", 10**6), ("eval.bootstrap_samples", 10**12),
    ("machine.provision_timeout_s", 1e9), ("machine.ssh_timeout_s", 1e9),
    ("machine.budget_check_every_s", 1e9), ("machine.checkpoint_sync_every_s", 1e12),
])
# machine.step_timeout_s is bounded by the reaper age x attempts rule (tests/test_rows.py).
def test_counts_and_timeouts_have_finite_upper_bounds(field, value):
    _refused({field: value}, field, "less than or equal to")


def test_the_manifest_is_a_manifest_inside_the_repository(tmp_path):
    for backend in ("vast", "local"):
        _refused({"data.manifest": "/etc/hostname", "machine.backend": backend}, "data.manifest", "not a manifest")
    _refused({"data.manifest": "../../../../../../../../etc/hostname"}, "data.manifest", "must stay inside the repository")
    _refused({"data.manifest": "README.md"}, "data.manifest", "not a manifest")
    own = tmp_path / "manifest.jsonl"
    own.write_text('{"audio": "a.wav", "text": "bonjour", "split": "train"}\n')
    _refused({"data.manifest": str(own)}, "data.manifest", "outside the folders pushed to the machine")
    assert load_config("tiny", {"data.manifest": str(own), "machine.backend": "local"}).data.manifest == str(own)


@pytest.mark.parametrize("license", ["mit\n[click](https://evil.example)", "mit license", "", "-x", "a" * 65])
def test_hub_license_is_a_license_id(license):
    _refused({"hub.license": license}, "hub.license")


@pytest.mark.parametrize("license", ["mit", "apache-2.0", "cc-by-nc-4.0", "openrail++", "other", "llama3.1"])
def test_hub_license_ids_load(license):
    assert load_config("tiny", {"hub.license": license}).hub.license == license
