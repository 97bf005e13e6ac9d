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


# Real templates' shapes (written here, not copied): each passed data prep's checks and stopped training at the
# first such row with a message that named no row.
_TURNS = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
          "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ ANSWER }}<|end|>\n{% endif %}{% endfor %}")
# Phi-3-mini's first template: no branch for a system message, so it is left out without a word.
DROPS_SYSTEM = _TURNS.replace("ANSWER", "m['content']") + "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
# Mistral v0.3's: the system text goes into the last user turn only when that turn is the last message, i.e. at
# inference, never in a conversation that ends in an answer.
SYSTEM_AT_THE_END = (
    "{% set rest = messages[1:] if messages[0]['role'] == 'system' else messages %}{% for m in rest %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.last and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n\n{% endif %}{{ m['content'] }}[/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}")
# Qwen3's: an earlier answer's reasoning (before </think>) is dropped from the history.
DROPS_EARLIER_REASONING = _TURNS.replace(
    "{{ ANSWER }}", "{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'].split('</think>')[-1] }}{% endif %}"
) + "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
# DeepSeek-R1-Distill's: the generation prompt opens a think block a finished answer does not have.
THINKS_AT_INFERENCE = DROPS_SYSTEM.replace("{% if add_generation_prompt %}<|assistant|>\n",
                                           "{% if add_generation_prompt %}<|assistant|>\n<think>\n")


@pytest.mark.parametrize("template", ["DROPS_SYSTEM", "SYSTEM_AT_THE_END"])
def test_a_template_that_leaves_the_system_message_out_names_the_row_and_the_config_key(models, tmp_path,
                                                                                        template):
    path = tmp_path / "t.jinja"
    path.write_text(globals()[template])
    cfg = config(models["base"], with_system(animal_rows(20), every=7), tmp_path, chat_template=str(path))
    with pytest.raises(DataError, match=r"train\.jsonl:1: the model's chat template leaves the system message out "
                                        r"of a conversation that ends in an answer"):
        prepare_data(cfg, tmp_path / "data")
    assert not (tmp_path / "data").exists()
    cfg.data.on_error = "skip"
    assert sum(prepare_data(cfg, tmp_path / "data").dataset.counts().values()) == 17
    cfg = config(models["base"], animal_rows(12), tmp_path, chat_template=str(path), system_prompt="Be brief.")
    with pytest.raises(ConfigError, match="data.system_prompt: the model's chat template leaves the system message "
                                          "out of a conversation that ends in an answer"):
        prepare_data(cfg, tmp_path / "data2")


def test_an_earlier_answer_the_template_rewrites_is_a_row_error_in_data_prep(models, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(DROPS_EARLIER_REASONING)
    rows = animal_rows(12)
    rows[3]["messages"] += [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "answer: owl"}]
    rows[3]["messages"][1]["content"] = "<think>It is a cat.</think>" + rows[3]["messages"][1]["content"]
    with pytest.raises(DataError, match=r"train\.jsonl:4: cannot mask the loss of this conversation: chat template "
                                        r"does not write assistant message 1 as given"):
        prepare_data(config(models["base"], rows, tmp_path, chat_template=str(path)), tmp_path / "data")


def test_a_generation_prompt_a_finished_answer_does_not_follow_is_refused_at_set_up(models, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(THINKS_AT_INFERENCE)
    with pytest.raises(ModelError, match=r"data.chat_template: .*t.jinja: chat template is not prefix-stable: .*"
                                         r"\(the prompt goes on '<think>\\n' where the conversation has 'Hi.<\|end\|>"):
        setup_chat_template(load_tokenizer(models["base"]), str(path))
    cfg = config(models["base"], animal_rows(12), tmp_path, chat_template=str(path))
    run = tmp_path / "run.yaml"
    run.write_text(dump_config(cfg))
    one_error(tunelab("run", str(run), "--dry-run"), "data.chat_template:", "not prefix-stable")


def test_a_custom_template_without_the_bos_the_model_was_pretrained_with_is_warned_about(models, tmp_path):
    """A family's template gets the tokenizer's bos in front; a .jinja file is used as written, and one without
    it trained the model on texts it never saw unopened (silently, before)."""
    from tunelab.progress import console

    bare, opened = tmp_path / "bare.jinja", tmp_path / "opened.jinja"
    bare.write_text(DROPS_SYSTEM)
    opened.write_text("{{ bos_token }}" + DROPS_SYSTEM)
    said = {}
    for path in (bare, opened):
        with console.capture() as captured:
            setup_chat_template(load_tokenizer(models["base"]), str(path))
        said[path.stem] = "".join(captured.get().split())  # the terminal's wrapping aside
    expected = f"warning: data.chat_template: {bare} does not write the tokenizer's bos '<|begin_of_text|>'"
    assert said["bare"].startswith("".join(expected.split())), said["bare"]
    assert "{{bos_token}}" in said["bare"] and said["opened"] == ""
