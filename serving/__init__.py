"""Batch inference with onnxruntime: model source, session, readers, writers, the job and its CLI.

Imports neither torch nor prefect (not even through nn_core, of which only the pure-numpy `nn_core.idx`
is used), so an inference-only install stays small.
"""
