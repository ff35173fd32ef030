"""ONNX plumbing that export, surgery and the engines share.

- graph:    load/save (atomic, byte-deterministic), the standard clean-up, shape
            inference, producer/consumer helpers
- patterns: the graph ideas passes are written in (Q/DQ parameters, Conv weight forms,
            packed INT4 constants)
- verify:   onnx.checker, the ONNX Runtime CPU session used for checking, and the
            comparison of outputs against a reference under the network's rounding noise

It imports nothing from the rest of cunet_optimize but errors and atomic: export and
surgery both stand on it, so neither has to import the other (bench/import_graph.py).
Polygraphy's comparator checks fixed atol/rtol; ours judges each output against the
same network's own rounding noise (verify.py says why), so it stays here.
"""
