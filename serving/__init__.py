"""Batch inference with onnxruntime: model source, session, readers, writers, the job and its CLI.

The torch-free bottom layer of the project: it imports neither torch nor prefect, nor anything of
`nn_core` or `flows`. The small I/O that the training side shares with it lives here too (IDX files in
`serving.idx`, atomic files in `serving.atomic`, MLflow experiments in `serving.experiments`, exit codes
in `serving.errors`), so `pip install '.[serving]'` and the inference image are exactly this package.
"""
