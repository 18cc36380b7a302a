"""The two tasks, each a run of the training loop: pretraining (`pretrain`) and fine-tuning on
ISIC 2017 (`finetune`, with its `classifier` and the `uda` consistency loss)."""
