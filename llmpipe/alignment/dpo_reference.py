"""The `dpo_reference` stage: the SFT model's log-probs of every preference pair, computed once.

    python -m llmpipe.alignment.dpo_reference --config configs/tiny.yaml

Writes `reference_logps.arrow` (training pairs) and `heldout_logps.arrow`, each an Arrow IPC file
with columns `index` (int64: the row's 0-based position in the preference file(s) as read),
`chosen_logp` and `rejected_logp` (float64: summed completion log-probs, `render.completion_logps`),
written to a temporary name, fsynced and renamed; the stage manifest holds their sha256s and DPO
verifies them before use. DPO then needs one forward per pair fewer per step. Its cache key
covers the reference weights, the preference data and the rendering, not DPO's own keys.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from llmpipe import io
from llmpipe.alignment.data import RowCounts, load_preferences
from llmpipe.alignment.render import ChatEncoder, EncodedPair, completion_logps, encode_pairs, pair_batch
from llmpipe.config import DPOReferenceSection, ModelSection
from llmpipe.context import StageContext, as_paths
from llmpipe.faults import fault_point
from llmpipe.model.release import WEIGHTS, load_release
from llmpipe.progress import progress
from llmpipe.tokenizer.train import load_tokenizer
from llmpipe.training.trainer import resolve_device

TRAIN_FILE, HELDOUT_FILE = "reference_logps.arrow", "heldout_logps.arrow"
SCHEMA = pa.schema([("index", pa.int64()), ("chosen_logp", pa.float64()), ("rejected_logp", pa.float64())])


@torch.no_grad()
def pair_logps(model: torch.nn.Module, pairs: list[EncodedPair], batch_size: int, label: str = "") -> pa.Table:
    """Summed completion log-probs of chosen and rejected for every pair, in the pairs' order."""
    device = model.tok_emb.weight.device
    chosen, rejected = [], []
    bar = progress(len(pairs), label, unit="pair")
    for start in range(0, len(pairs), batch_size):
        batch = pair_batch(pairs[start:start + batch_size])
        logps = completion_logps(model, {k: v.to(device) for k, v in batch.items()}).double().cpu()
        half = len(logps) // 2
        chosen += logps[:half].tolist()
        rejected += logps[half:].tolist()
        bar.update(half)
    bar.close()
    return pa.table({"index": [p.index for p in pairs], "chosen_logp": chosen, "rejected_logp": rejected},
                    schema=SCHEMA)


def write_table(table: pa.Table, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        fault_point("dpo_reference", f"wrote_{path.stem}")  # LLMPIPE_FAULT: killed before the rename


def read_table(folder: Path, name: str) -> pa.Table:
    """A reference file, verified against the stage manifest first."""
    with pa.memory_map(str(io.verify_listed(folder, name))) as source:
        return pa.ipc.open_file(source).read_all()


def pref_accuracy(table: pa.Table) -> float:
    """Share of pairs whose chosen completion is more likely than the rejected one."""
    chosen, rejected = table["chosen_logp"].to_pylist(), table["rejected_logp"].to_pylist()
    return sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(chosen))


def reference_stage(ctx: StageContext, model_cfg: ModelSection, cfg: DPOReferenceSection) -> dict:
    torch.manual_seed(ctx.seed)
    encoder = ChatEncoder(load_tokenizer(ctx.inputs["tokenizer"]))
    io.verify_listed(ctx.inputs["reference"], WEIGHTS)
    model = load_release(ctx.inputs["reference"], resolve_device(cfg.device, "dpo_reference")).eval()
    max_length = cfg.max_length or model_cfg.seq_len
    result = {}
    for split, name, key in (("train", TRAIN_FILE, "data"), ("heldout", HELDOUT_FILE, "heldout")):
        counts = RowCounts(f"dpo.{'data' if split == 'train' else 'heldout_data'}")
        pairs = encode_pairs(encoder, load_preferences(as_paths(ctx.inputs[key]), counts), max_length, counts)
        counts.require_rows(pairs)
        table = pair_logps(model, pairs, cfg.micro_batch_size, f"reference {split}")
        write_table(table, ctx.out_dir / name)
        result[f"{split}_pairs"] = len(pairs)
        result[f"{split}_data"] = counts.to_manifest()
        result[f"{split}_pref_accuracy"] = pref_accuracy(table)
    return result


if __name__ == "__main__":
    from llmpipe.runner import stage_main

    stage_main("dpo_reference")
