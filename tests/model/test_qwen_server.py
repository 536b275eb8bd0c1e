"""The `openai` client against `pagedserve serve` on the tiny QWen checkpoint: completions, chat with the
built-in ChatML template, a Chinese chat streamed intact through SSE, <|im_end|> ending a reply with no
stop fields, and a prompt id past the tokenizer refused with a 400."""
from __future__ import annotations

import openai
import pytest

from tests.model.qwen_tiny import build_qwen_tiny
from tests.servers import running_server

CHAT = [{"role": "user", "content": "请用三句话介绍一下长城，并说明它的历史意义。🏯"}]
REPLY = "长城很长，像一条巨龙。它有两千多年的历史！★"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_qwen_tiny(tmp_path_factory.mktemp("qwen-serve"))
    with running_server([str(path), "--trust-remote-code", "--max-model-len", "256", "--kv-cache-memory", "0.05",
                         "--max-num-seqs", "8"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_completion(client, model):
    r = client.completions.create(model=model, prompt="The Great Wall of China is", max_tokens=6, temperature=0)
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str) and r.choices[0].text


def test_chinese_chat_streams_intact(client, model):
    """A Chinese reply (held to one text by guided_choice, since the tiny model's own words are noise) streams
    in deltas that never hold half a character, whatever byte-level tokens the model picks on the way, and
    they add up to the unstreamed reply."""
    kw = dict(model=model, messages=CHAT, max_tokens=64, temperature=0, extra_body={"guided_choice": [REPLY]})
    whole = client.chat.completions.create(**kw)
    assert whole.usage.prompt_tokens > 20  # the default system prompt was rendered in
    assert whole.choices[0].message.content == REPLY
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
              if c.choices]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == REPLY and len([d for d in deltas if d]) > 1


def test_im_end_stops_without_stop_fields(client, model):
    """logit_bias makes <|im_end|> the first token: the reply ends there (finish_reason stop, 1 token)."""
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0,
                                       logit_bias={"151645": 100})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].message.content == ""


def test_prompt_id_past_the_tokenizer_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=[1, 2, 151900], max_tokens=2)
    assert e.value.status_code == 400 and e.value.body.get("param") == "prompt"


def test_chat_template_flag_reads_a_file_or_text(tmp_path):
    from pagedserve.errors import ConfigError
    from pagedserve.server.serve_command import read_chat_template

    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(str(f)) == "{{ messages[0]['content'] }}"
    assert read_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{%")
    with pytest.raises(ConfigError, match="no such file"):
        read_chat_template(str(tmp_path / "missing.jinja"))
