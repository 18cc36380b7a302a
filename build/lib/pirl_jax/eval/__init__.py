"""Evaluators of the training loop and their metrics: frozen-trunk probes (`probe`, `probes`,
`features`), the tile pathway's diagnostics (`tile_pathway`) and ISIC 2017 scoring (`isic`)."""
