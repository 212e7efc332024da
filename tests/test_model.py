"""model.py: shapes, initial loss, learning, and the safetensors loader."""
import json
import math
import struct

import pytest
import torch

import checkpoints
from checkpoints import load_safetensors
from model import GPT, SIZES


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(dict(SIZES["tiny"], vocab_size=97, **kw))


def test_shapes_and_initial_loss_near_uniform():
    model = tiny()
    idx = torch.randint(97, (3, 20))
    logits, loss = model(idx, torch.randint(97, (3, 20)))  # targets independent of the inputs
    assert logits.shape == (3, 20, 97)
    assert abs(loss.item() - math.log(97)) < 0.3  # small init: close to a uniform guess


def test_overfits_one_batch():
    model = tiny()
    idx = torch.randint(97, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


def test_generate_and_context_limit():
    model = tiny()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=70)  # past block_size 64
    assert out.shape == (2, 73)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def gpt2_style_tensors(model):
    """The model's weights under Hugging Face GPT-2 names, Conv1D weights stored (in, out)."""
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        hf = key.removeprefix("transformer.")
        conv = hf.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
        out[hf] = t.t().contiguous() if conv else t
    return out


def test_from_pretrained_reads_gpt2_layout(tmp_path):
    src = tiny()
    write_safetensors(tmp_path / "model.safetensors", gpt2_style_tensors(src))
    loaded = checkpoints.gpt2_from_hf(str(tmp_path), n_head=src.config.n_head)
    idx = torch.randint(97, (2, 16))
    assert torch.equal(src(idx)[0], loaded(idx)[0])


def test_safetensors_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        load_safetensors(str(bad))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="do not match"):
        load_safetensors(str(bad))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoints.gpt2_from_hf(str(tmp_path))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="no GPT-2 blocks"):                  # valid file, not a GPT-2
        checkpoints.gpt2_from_hf(str(tmp_path))
