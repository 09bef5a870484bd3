"""Export a stage's release weights as a Hugging Face `LlamaForCausalLM` folder.

    out/config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...

Our layout is Llama's (half-rotation rotary, RMSNorm, SwiGLU, no biases), so the export renames
tensors and writes the config; `transformers` loads it with no custom code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmpipe import io
from llmpipe.config import ModelSection
from llmpipe.errors import UserError
from llmpipe.model.release import CONFIG, WEIGHTS, load_config, write_safetensors
from llmpipe.paths import MANIFEST, RunDir
from llmpipe.tokenizer.special import EOT_ID, PAD_ID

# our name -> Hugging Face Llama name; {i} is the layer index
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, layer, rest = name.split(".", 2)
    if prefix != "trf_blocks" or rest not in _BLOCK_NAMES:
        raise KeyError(f"no Hugging Face name for tensor {name!r}")
    return f"model.layers.{layer}.{_BLOCK_NAMES[rest]}"


def hf_config(cfg: ModelSection) -> dict:
    """config.json of the equivalent transformers LlamaConfig (v5 field names)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": EOT_ID,  # documents follow an end-of-text token in the training stream
        "eos_token_id": EOT_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def export_weights(folder: Path, out: Path) -> None:
    """Release weights in `folder` -> `out`/config.json + model.safetensors (renamed tensors)."""
    cfg = load_config(folder)
    tensors = load_file(str(Path(folder) / WEIGHTS))
    renamed = {hf_name(k): v.to(torch.float32).contiguous() for k, v in tensors.items()}
    write_safetensors(renamed, Path(out) / "model.safetensors")
    io.write_json(Path(out) / "config.json", hf_config(cfg))
    io.write_json(Path(out) / "generation_config.json",
                  {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": PAD_ID,
                   "do_sample": True, "temperature": 1.0, "max_new_tokens": 64})


def copy_tokenizer(tokenizer_dir: Path, out: Path) -> list[str]:
    """Copy the tokenizer stage's files (tokenizer.json, tokenizer_config.json, ...) into `out`."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer_dir / 'tokenizer.json'} is missing (run `llmpipe tokenizer` first)")
    copied = []
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".") and path.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copyfile(path, Path(out) / path.name)
            copied.append(path.name)
    return copied


def export_hf(run_dir: Path, stage: str, out: Path) -> Path:
    """Write a Hugging Face folder at `out` from `stage`'s final weights and the run's tokenizer."""
    from llmpipe.stages import verify_outputs

    run_dir = RunDir(run_dir)
    verify_outputs(run_dir, stage, [WEIGHTS, CONFIG])  # the stage finished and its weights are intact
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    export_weights(run_dir.stage(stage), out)
    copy_tokenizer(run_dir.tokenizer_dir, out)
    io.write_json(out / "llmpipe_export.json", {"run_dir": str(run_dir.root), "stage": stage,
                                                "source_manifest": json.loads(run_dir.manifest(stage).read_text())["fingerprint"]})
    return out
