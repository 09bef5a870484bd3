"""Everything that touches torch.distributed: process groups and meshes (`env`), `parallelize`
(DDP, ZeRO-1/2/3, tensor, pipeline and 2-D parallel) and resharding checkpoints (`checkpoint`).

Nothing else in llmpipe imports torch.distributed; the model stays single-device code.
"""
