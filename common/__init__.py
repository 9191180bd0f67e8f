"""What every layer shares, imported downward by all of them (serving, nn_core, flows): the settings
read from the environment, the exit codes and user-facing errors, atomic files, the IDX format and
the MLflow store and experiments. Standard library, numpy and mlflow-skinny only: no torch, no
Prefect, no onnxruntime, so the slim inference image carries it beside `serving`.
"""
