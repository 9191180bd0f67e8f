"""Everything about the model: data, model, DDP training, evaluation, ONNX export, MLflow tracking
and the registry gate. Knows nothing of Prefect."""
