"""Evaluation on ISIC 2017 Part 3: fine-tuning and linear probe (`finetune`), and the
scratch / PIRL / supervised comparison (`compare`)."""
