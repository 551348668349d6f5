"""Small mtlkit-shaped state dicts (backbone / decoder / heads, BN buffers) for the merging tests."""
from __future__ import annotations

import copy

import torch
from safetensors.torch import save_file


def make_models(T: int = 3, seed: int = 0, heads: bool = True, dtype=torch.float32, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    pre = {
        "backbone.conv.weight": rnd(8, 3, 3, 3),
        "backbone.bn.weight": rnd(8),
        "backbone.bn.bias": rnd(8),
        "backbone.bn.running_mean": rnd(8),
        "backbone.bn.running_var": torch.rand(8, generator=g).to(dtype) + 0.5,
        "backbone.bn.num_batches_tracked": torch.tensor(100),
        "backbone.blocks.0.weight": rnd(16, 8),
        "backbone.blocks.0.bias": rnd(16),
        "decoder.proj.weight": rnd(12, 16),
    }
    fts = []
    for t in range(T):
        ft = {}
        for k, v in pre.items():
            if v.is_floating_point():
                ft[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype)
            else:
                ft[k] = v + 10 * (t + 1)
        ft["backbone.bn.running_var"] = pre["backbone.bn.running_var"] * (0.5 + torch.rand(8, generator=g)).to(dtype)
        if heads:
            ft[f"heads.task{t}.weight"] = rnd(t + 2, 12)
            ft[f"heads.task{t}.bias"] = rnd(t + 2)
        fts.append(ft)
    return pre, fts


def save_models(tmp_path, pre, fts, folders: bool = True):
    """Write θ0 and the fine-tunes as model folders (model.safetensors inside) or bare files."""
    paths = []
    for name, sd in [("pre", pre)] + [(f"ft{t}", ft) for t, ft in enumerate(fts)]:
        if folders:
            d = tmp_path / name
            d.mkdir()
            save_file(sd, str(d / "model.safetensors"))
            paths.append(d)
        else:
            p = tmp_path / f"{name}.safetensors"
            save_file(sd, str(p))
            paths.append(p)
    return paths[0], paths[1:]


def clone_all(sds):
    return copy.deepcopy(sds)


def assert_same(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def llama_shapes(hidden=64, inter=128, layers=2, vocab=256, kv_heads=2, heads=4):
    """Tensor names and shapes of a Hugging Face LlamaForCausalLM, in its own order."""
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    return shapes, config


def write_llama(folder, seed=0, base=None, scale=0.01, dtype=torch.bfloat16, shard_size=None, **dims):
    """A Llama-shaped Hugging Face folder: random weights, or `base` (a state dict) plus noise."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    shapes, config = llama_shapes(**dims)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        x = torch.randn(s, generator=g) * (scale if base is not None else 0.02)
        sd[k] = ((base[k].float() + x) if base is not None else x).to(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return sd
