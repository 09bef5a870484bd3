"""Post-training: instruction data, rendering and masks, SFT, DPO (and the reward model, PPO)."""
