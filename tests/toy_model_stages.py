"""Toy stages whose code imports the model, as training and evaluation stages do."""

from llmpipe.model import model  # noqa: F401  (what matters is the import: it puts model.py in the code version)


def train(ctx, cfg):
    (ctx.out_dir / "out.txt").write_text(f"trained d_model={cfg.d_model} on {(ctx.inputs['source'] / 'out.txt').read_text()}")
    return {"steps": 1}


def evaluate(ctx, cfg):
    (ctx.out_dir / "out.txt").write_text(f"evaluated {(ctx.inputs['model'] / 'out.txt').read_text()}")
    return {"score": 1}
