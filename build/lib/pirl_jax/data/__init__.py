"""Data layer: ISIC 2017 reader, tfds builder, synthetic set, unlabelled sources, tf.data views.

The only package that imports TensorFlow. Modules:

* `errors`: the user-error types of the data layer; `paths`: `~` expansion and the cache root.
* `images`: decoding, validation and preparation of image files (PIL), with an on-disk cache.
* `isic`: the ISIC 2017 Part 3 reader and the one definition of its layout (`SPLITS`).
* `tfds_isic2017`: the `isic2017` tfds builder.
* `synthetic_render`: the synthetic dermoscopy renderer; `synthetic`: the synthetic set in the ISIC
  2017 layout (writer, cache, CLI).
* `augment`: stateless tf.data augmentations; `jigsaw`: the two PIRL views built from them.
* `sources`, `pipeline`: the pretraining sources and input pipeline.
* `labelled`: the labelled ISIC 2017 splits and the fine-tuning input.
"""
