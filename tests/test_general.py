"""The same LLM, judged beyond the plays - the general-English set beside the held-out plays, the
chat template (ChatML) and the report's chat answers, and the text the teacher writes for distillation."""
import numpy as np
import pytest
import torch

import checkpoints
import train_kd
from model import GPT, SIZES

# SmolLM2-135M-Instruct's tokenizer.chat_template, as its GGUF stores it
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
LLAMA2_TEMPLATE = "{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"


def test_the_chatml_template_is_read_with_its_default_system_message():
    chat = checkpoints.chat_template(SMOLLM2_TEMPLATE, "smol.gguf")
    assert chat == {"form": "chatml", "system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                    "end": "<|im_end|>"}
    prompt = checkpoints.chat_prompt(chat, [{"role": "user", "content": "What is 12 + 7?"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")
    own = checkpoints.chat_prompt(chat, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in own


def test_another_chat_template_is_refused_by_name_never_run():
    with pytest.raises(ValueError, match=r"llama.gguf: its tokenizer.chat_template is not ChatML"):
        checkpoints.chat_template(LLAMA2_TEMPLATE, "llama.gguf")
    with pytest.raises(ValueError, match="no chat template"):
        checkpoints.chat_prompt(None, [{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="role"):
        checkpoints.chat_prompt(checkpoints.chat_template(SMOLLM2_TEMPLATE, "x"), [{"text": "Hi"}])


def test_an_answer_that_loops_is_flagged():
    assert train_kd.loops("What is the capital of France? The Frenchman The Frenchman The Frenchman The Frenchman")
    assert train_kd.loops("You are a good friend, you are a good friend, you are a good friend")
    assert train_kd.loops("The code in Python:\n```python2022222222222222222222222222222222")
    assert not train_kd.loops("The capital of France is Paris.")
    assert not train_kd.loops("It costs 1000 dollars, or 12.5 % of 8000.")
    assert not train_kd.loops("1. Stay hydrated: drink water. 2. Eat a balanced diet. 3. Get enough sleep each night.")


def tiny_llm(vocab_size=256):
    torch.manual_seed(0)
    return GPT(dict(SIZES["tiny"], vocab_size=vocab_size)).eval()


def test_teacher_text_is_written_once_cached_and_mixed_in_equal_shares(tmp_path, monkeypatch):
    monkeypatch.setattr(train_kd, "DATA_ROOT", str(tmp_path))
    teacher, meta = tiny_llm(), {"tokenizer": "bytes"}
    config = dict(train_kd.DEFAULTS, preset="tiny", distill_data="teacher", teacher_text_seqs=5, block_size=16)
    plays = np.arange(1000, dtype=np.uint16) % 256
    text = train_kd.distillation_tokens(config, teacher, meta, plays)
    assert text.dtype == np.uint16 and len(text) == 5 * 16 and text.max() < 256
    write = train_kd.write_teacher_text
    monkeypatch.setattr(train_kd, "write_teacher_text", lambda *a, **k: pytest.fail("the cache was not used"))
    assert np.array_equal(train_kd.distillation_tokens(config, teacher, meta, plays), text)
    mixed = train_kd.distillation_tokens(dict(config, distill_data="mix"), teacher, meta, plays)
    assert len(mixed) == 2 * len(text) and np.array_equal(mixed[:len(text)], text)
    assert np.array_equal(mixed[len(text):len(text) + 16], plays[:16])     # the plays' first window
    assert train_kd.distillation_tokens(dict(config, distill_data="plays"), teacher, meta, plays) is plays
    assert np.array_equal(train_kd.distillation_tokens(dict(config, seed=7), teacher, meta, plays), text)  # its own seed
    monkeypatch.setattr(train_kd, "write_teacher_text", write)
    other = train_kd.distillation_tokens(dict(config, teacher_text_seed=7), teacher, meta, plays)   # written anew
    assert len(other) == len(text)


def test_the_teacher_text_prompts_are_one_drawn_token_or_the_chat_opening():
    by_byte = sorted(checkpoints.gpt2_byte_alphabet().items(), key=lambda kv: kv[1])   # the 256 single bytes
    enc = checkpoints.bpe_tokenizer("t", [c for c, _ in by_byte] + ["<|im_start|>", "<|im_end|>"], [], {256, 257},
                                    "gpt2")
    enc.chat = {"form": "chatml", "system": None, "end": "<|im_end|>"}
    prompts = train_kd.teacher_text_prompts(enc, 2 * train_kd.TEACHER_TEXT_BATCH, torch.Generator().manual_seed(0))
    first, second = prompts[:train_kd.TEACHER_TEXT_BATCH], prompts[train_kd.TEACHER_TEXT_BATCH:]
    assert all(len(p) == 1 and p[0] < 256 for p in first)                   # never a special token
    assert all(enc.decode(p) == "<|im_start|>user\n" for p in second)        # the user's turn, left open


def test_general_english_is_judged_beside_the_plays_only_when_asked(tiny_data):
    data_dir, meta = tiny_data
    assert set(train_kd.held_out_sets(dict(general_eval="auto"), meta)) == {"val"}   # a custom dataset
    assert set(train_kd.held_out_sets(dict(general_eval="no"), meta)) == {"val"}
    with pytest.raises(ValueError, match="general_eval"):
        train_kd.parse_config(["--general_eval=maybe"])


def test_the_table_shows_both_sets_as_multiples_of_the_teacher(capsys):
    rows = [dict(method="teacher", bits=32, bits_per_weight=32.0, val_loss=1.0, ppl=2.0, general_loss=2.0,
                 general_ppl=4.0, bytes=10, seconds=1.0),
            dict(method="lcd", bits=2, bits_per_weight=2.1, val_loss=1.5, ppl=3.0, general_loss=2.5,
                 general_ppl=10.0, bytes=1, seconds=2.0)]
    train_kd.print_table(rows, "t")
    line = capsys.readouterr().out.splitlines()[-1].split()
    assert line[0] == "lcd" and line[5] == "1.500" and line[8] == "2.500"


def test_budget_multiplies_the_distillation_steps_of_either_default():
    pretrained = train_kd.parse_config(["--init_from=smollm2", "--budget=4"])
    assert (pretrained["block_steps"], pretrained["kd_steps"]) == (4 * train_kd.PRETRAINED_DEFAULTS["block_steps"],
                                                                  4 * train_kd.PRETRAINED_DEFAULTS["kd_steps"])
    scratch = train_kd.parse_config(["--budget=0.5", "--kd_steps=9"])
    assert scratch["kd_steps"] == 4 or scratch["kd_steps"] == 5          # round(4.5): given steps are scaled too
    for bad in ("0", "-2", "inf"):
        with pytest.raises(ValueError, match="--budget"):
            train_kd.parse_config([f"--budget={bad}"])
