"""Flax linen models: the ResNet trunk and the PIRL network (trunk + heads f and g)."""
