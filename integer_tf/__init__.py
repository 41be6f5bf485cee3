"""The TensorFlow side of the integers: the integer-only layers trained with --integer_only
(intonly_layers), the TF twins of integer/kernels.py (kernels_tf), the exporter (export), and the
comparison of the TF graph with the integer engine, site by site (compare)."""
