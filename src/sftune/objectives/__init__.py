"""Training objectives of the one loop (training/loop.py): each supplies its batches, what its loss is divided by,
its metrics and its validation. SFT (sft.py: token cross-entropy on the response), DPO / IPO / SimPO (dpo.py)."""
