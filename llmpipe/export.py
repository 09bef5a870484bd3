"""Export a stage's release weights as a Hugging Face `LlamaForCausalLM` folder (a reward
model's as `LlamaForSequenceClassification` with one label).

    out/config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...

Our layout is Llama's (half-rotation rotary, RMSNorm, SwiGLU, no biases), so the export renames
tensors and writes the config; `transformers` loads it with no custom code.

The exported tokenizer feeds the model what llmpipe does: `tokenizer(text)` puts an end-of-text
token first (a post-processor in the exported `tokenizer.json` only), as `llmpipe generate` does,
and `apply_chat_template(messages, add_generation_prompt=True)` gives `ChatEncoder.prompt`'s ids
(the template opens with the end-of-text itself and transformers tokenizes it without special
tokens, so it appears once). Generation stops at `<|end|>` and at `<|endoftext|>`, and samples
as `llmpipe chat` does by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, processors

from llmpipe import io
from llmpipe.chat import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, default_max_new_tokens
from llmpipe.config import ModelSection
from llmpipe.errors import UserError
from llmpipe.model.release import CONFIG, WEIGHTS, load_config, load_head, write_safetensors
from llmpipe.paths import RunDir
from llmpipe.tokenizer.chat import CHAT_TEMPLATE
from llmpipe.tokenizer.special import END_OF_TURN, END_OF_TURN_ID, EOT, EOT_ID, PAD, PAD_ID
from llmpipe.tokenizer.train import copy_tokenizer

STOP_IDS = [EOT_ID, END_OF_TURN_ID]  # end of document, end of turn

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
              "lm_head.weight": "lm_head.weight", "score.weight": "score.weight"}


def hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, layer, rest = name.split(".", 2)
    if prefix != "trf_blocks" or rest not in _BLOCK_NAMES:
        raise KeyError(f"no Hugging Face name for tensor {name!r}")
    return f"model.layers.{layer}.{_BLOCK_NAMES[rest]}"


def hf_config(cfg: ModelSection, head: str = "lm") -> dict:
    """config.json of the equivalent transformers LlamaConfig (v5 field names). A score model is a
    `LlamaForSequenceClassification` with one label, which reads the score at the rightmost token
    that is not `pad_token_id`: the last token of the conversation, where ours reads it."""
    score = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if head == "score" else {}
    return {
        "architectures": ["LlamaForSequenceClassification" if head == "score" else "LlamaForCausalLM"],
        **score,
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
        "tie_word_embeddings": cfg.tie_embeddings and head == "lm",  # a score model has no output embeddings
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": EOT_ID,  # documents follow an end-of-text token in the training stream
        "eos_token_id": STOP_IDS,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def export_weights(folder: Path, out: Path) -> None:
    """Release weights in `folder` -> `out`/config.json + model.safetensors (renamed tensors)."""
    cfg, head = load_config(folder), load_head(folder)
    tensors = load_file(str(Path(folder) / WEIGHTS))
    renamed = {hf_name(k): v.to(torch.float32).contiguous() for k, v in tensors.items()}
    write_safetensors(renamed, Path(out) / "model.safetensors")
    io.write_json(Path(out) / "config.json", hf_config(cfg, head))
    if head == "lm":  # a score model does not generate
        io.write_json(Path(out) / "generation_config.json", generation_config(cfg))


def generation_config(cfg: ModelSection) -> dict:
    """generation_config.json: stop at end of turn or of text, sample as `llmpipe chat` does."""
    return {"bos_token_id": EOT_ID, "eos_token_id": STOP_IDS, "pad_token_id": PAD_ID,
            "do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P,
            "top_k": 0,  # none (transformers' default would be 50)
            "max_new_tokens": default_max_new_tokens(cfg.seq_len)}


def with_leading_eot(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer, its encodings opened by `<|endoftext|>` when special tokens are added (the
    default of `tokenizer(text)` in transformers); without them, ids are unchanged."""
    if tokenizer.token_to_id(EOT) != EOT_ID or tokenizer.token_to_id(END_OF_TURN) != END_OF_TURN_ID \
            or tokenizer.token_to_id(PAD) != PAD_ID:
        raise UserError("the tokenizer's special tokens are not llmpipe's (train it with the tokenizer stage)")
    template = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1",
                                             special_tokens=[(EOT, EOT_ID)])
    old = tokenizer.post_processor  # the stage's ByteLevel one only fixes offsets
    tokenizer.post_processor = template if old is None else processors.Sequence([old, template])
    plain = tokenizer.encode("a b", add_special_tokens=False).ids
    if tokenizer.encode("a b").ids != [EOT_ID, *plain]:
        raise UserError("the tokenizer already adds special tokens; cannot put one end-of-text first")
    return tokenizer


def export_tokenizer(tokenizer_dir: Path, out: Path, model_max_length: int) -> list[str]:
    """The tokenizer stage's files in `out`, the tokenizer opening plain text with an end-of-text,
    its config carrying llmpipe's chat template (the one `ChatEncoder` renders) and the context."""
    copied = copy_tokenizer(tokenizer_dir, out)
    out = Path(out)
    tokenizer = with_leading_eot(Tokenizer.from_file(str(out / "tokenizer.json")))
    io.write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    # bos_token names the end-of-text the post-processor adds; transformers does not add it again
    config.update(bos_token=EOT, chat_template=CHAT_TEMPLATE, model_max_length=model_max_length)
    io.write_json(config_path, config)
    special_map = out / "special_tokens_map.json"
    if special_map.is_file():
        io.write_json(special_map, {**json.loads(special_map.read_text()), "bos_token": EOT})
    return sorted({*copied, "tokenizer_config.json"})


def export_hf(run_dir: Path, stage: str, out: Path) -> Path:
    """Write a Hugging Face folder at `out` from `stage`'s final weights and the run's tokenizer."""
    from llmpipe.stages import verify_outputs

    run_dir = RunDir(run_dir)
    verify_outputs(run_dir, stage, [WEIGHTS, CONFIG])  # the stage finished and its weights are intact
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    export_weights(run_dir.stage(stage), out)
    export_tokenizer(run_dir.tokenizer_dir, out, load_config(run_dir.stage(stage)).seq_len)
    io.write_json(out / "llmpipe_export.json", {"run_dir": str(run_dir.root), "stage": stage,
                                                "source_manifest": io.read_manifest(run_dir.stage(stage))["fingerprint"]})
    return out
