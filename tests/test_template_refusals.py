"""Rows, prompts and templates a model's chat template refuses: one line naming the row (or the config key),
never a traceback; with `on_error: skip` the refused rows are skipped and reported, the others kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import model_zoo as zoo
from tests.conftest import animal_rows, write_jsonl
from tests.test_cli_errors import one_error, tunelab
from tunelab.chat import setup_chat_template
from tunelab.config import SuiteConfig
from tunelab.config_file import dump_config, validate_config
from tunelab.data.prepare import prepare_data
from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.models import load_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusing")
    return {"mistral": zoo.build_family_model("mistral", root / "mistral"),
            "gemma": zoo.build_family_model("gemma", root / "gemma"),
            "base": zoo.build_base_model(root / "base")}


def config(model: Path, rows: list[dict], tmp_path: Path, **data: object):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    return validate_config({"model": {"name": str(model)}, "data": {"train": str(train), "val_fraction": 0.0,
                            "test_fraction": 0.2, **data}, "track": {"enabled": False},
                            "output": {"dir": str(tmp_path / "run")}})


def with_system(rows: list[dict], every: int) -> list[dict]:
    for i, row in enumerate(rows):
        if i % every == 0:
            row["messages"].insert(0, {"role": "system", "content": "Be brief."})
    return rows


def test_a_system_message_the_template_has_no_role_for_names_the_row(models, tmp_path):
    cfg = config(models["mistral"], with_system(animal_rows(20), every=7), tmp_path)
    with pytest.raises(DataError, match=r"train\.jsonl:1: the model's chat template takes no system message "
                                        r"\(Conversation roles must alternate.*\); put the system text into the "
                                        r"first user turn"):
        prepare_data(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_on_error_skip_skips_the_refused_rows_and_keeps_the_rest(models, tmp_path):
    cfg = config(models["mistral"], with_system(animal_rows(20), every=7), tmp_path, on_error="skip")
    prepared = prepare_data(cfg, tmp_path / "data")
    assert sum(prepared.dataset.counts().values()) == 17  # rows 1, 8 and 15 carried a system message
    skipped = prepared.report["skipped"]
    assert skipped["count"] == 3 and skipped["examples"][0]["where"].endswith("train.jsonl:1")
    assert "takes no system message" in skipped["examples"][0]["problem"]


def test_roles_that_do_not_alternate_are_a_row_error(models, tmp_path):
    rows = animal_rows(12)
    rows[4]["messages"].insert(0, {"role": "user", "content": "Hello?"})  # two user turns in a row
    with pytest.raises(DataError, match=r"train\.jsonl:5: the model's chat template refuses this conversation: "
                                        r"Conversation roles must alternate"):
        prepare_data(config(models["gemma"], rows, tmp_path), tmp_path / "data")


def test_a_system_prompt_the_template_cannot_take_is_a_config_error(models, tmp_path):
    cfg = config(models["mistral"], animal_rows(12), tmp_path, system_prompt="Be brief.")
    with pytest.raises(ConfigError, match="data.system_prompt: the model's chat template takes no system message"):
        prepare_data(cfg, tmp_path / "data")
    # Gemma writes the system text into the first user turn: the same prompt is fine there.
    prepare_data(config(models["gemma"], animal_rows(12), tmp_path, system_prompt="Be brief."), tmp_path / "g")


def test_a_broken_custom_template_is_one_line_naming_file_and_line(models, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }}}\n{% endfor %")
    with pytest.raises(ModelError, match=rf"data.chat_template: {broken}: line 3: template syntax error"):
        setup_chat_template(load_tokenizer(models["base"]), str(broken))
    refuses = tmp_path / "refuses.jinja"
    refuses.write_text("{{ raise_exception('this template renders nothing') }}")
    with pytest.raises(ModelError, match="cannot render a user question and its answer: this template renders"):
        setup_chat_template(load_tokenizer(models["base"]), str(refuses))


def test_an_eval_suite_row_the_template_refuses_names_the_suite_and_row(models, tmp_path):
    from tunelab.eval.run import suite_records

    suite_file = write_jsonl(tmp_path / "suite.jsonl", with_system(animal_rows(4), every=3))
    cfg = config(models["mistral"], animal_rows(12), tmp_path)
    suite = SuiteConfig(name="orders", files=[suite_file])
    with pytest.raises(DataError, match=r"eval suite 'orders': .*suite\.jsonl:1: the model's chat template takes "
                                        "no system message"):
        suite_records(cfg, suite, None, load_tokenizer(models["mistral"]))


def test_the_cli_says_it_in_one_line(models, tmp_path):
    cfg = config(models["mistral"], with_system(animal_rows(12), every=5), tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    one_error(tunelab("data", "prep", str(path)), "train.jsonl:1:", "takes no system message")
    one_error(tunelab("run", str(path), "--dry-run"), "train.jsonl:1:", "takes no system message")


def test_the_no_template_warning_is_said_once_per_run(models, tmp_path):
    cfg = config(models["base"], animal_rows(12), tmp_path)
    cfg.train.max_steps, cfg.eval.forgetting, cfg.eval.systems, cfg.eval.max_new_tokens = 1, False, ["tuned"], 2
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    done = tunelab("run", str(path))
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: the gate may fail on a random model
    assert done.stderr.count("the model has no chat template; using chatml") == 1, done.stderr[-3000:]


def test_dry_run_names_skipped_rows_and_a_max_length_past_the_context(models, tmp_path):
    cfg = config(models["mistral"], with_system(animal_rows(20), every=7), tmp_path, on_error="skip",
                 max_length=4096)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    done = tunelab("run", str(path), "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    out = " ".join(done.stdout.split())
    assert "3 bad rows skipped (data.on_error: skip; listed in the data report)" in out
    assert "warning: data.max_length 4,096 is longer than the model's context (512 tokens)" in out, out[:3000]


def test_a_custom_generation_prompt_ending_in_a_space_is_refused(tiny_model_dir, tmp_path):
    """'Assistant: ' then the answer: a byte-level BPE joins that space to the answer's first word, so training
    would label the answer from its second token and inference would end its prompt on a lone space token."""
    body = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    spaced, tight = tmp_path / "spaced.jinja", tmp_path / "tight.jinja"
    spaced.write_text(body + "{% if add_generation_prompt %}assistant: {% endif %}")
    tight.write_text(body + "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(ModelError, match=r"data.chat_template: .*spaced.jinja: its generation prompt ends inside "
                                         r"the answer's first token \(it ends with '.*assistant: '\)"):
        setup_chat_template(load_tokenizer(tiny_model_dir), str(spaced))
    setup_chat_template(load_tokenizer(tiny_model_dir), str(tight))
