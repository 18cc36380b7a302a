"""Data layer: ISIC 2017 reader, tfds builder, synthetic set, unlabelled sources, tf.data views.

The only package that imports TensorFlow.
"""
