"""Batch inference with onnxruntime: model source, session, readers, writers, the job and its CLI.

The torch-free batch job: it imports neither torch nor prefect, nor anything of `nn_core` or
`flows`; what it shares with the training side (settings, errors, atomic files, IDX, MLflow
experiments) is in `common`, below it. `pip install '.[serving]'` and the inference image are exactly
these two packages.
"""
