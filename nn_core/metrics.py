"""The one table of MLflow metric names. MLflow's UI groups metrics into sections by the part before
the first `/`, so the names say where a figure belongs:

- per-epoch series (step = epoch): `train/...`, `val/...`
- per-step series (step = optimizer step): `train_step/...`, a section of its own, so that its
  thousands of steps never share an axis with the epoch charts
- final figures logged once (step 0), not series: `test/...`, `parity/...`, `time/...`
- a sweep parent: `sweep/...`; system metrics (MLflow's monitor): `system/...`

Every reader and writer of a metric name imports it from here.
"""

TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
LR = "train/lr"
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"  # its last value is the final validation accuracy (the model's metric)
TRAIN_LOSS_STEP = "train_step/loss"
EPOCH_SECONDS = "time/epoch_seconds"

TEST_ACCURACY = "test/accuracy"
TEST_LOSS = "test/loss"
TRAIN_SECONDS = "time/train_seconds"
SECONDS_TO_TARGET = "time/seconds_to_target"

PARITY_MAX_ABS_DIFF = "parity/max_abs_diff"
PARITY_ARGMAX_AGREEMENT = "parity/argmax_agreement"
PARITY_ONNX_VAL_ACCURACY = "parity/onnx_val_accuracy"

SWEEP_BEST_VAL_ACCURACY = "sweep/best_val_accuracy"

# history keys of the epoch loop (nn_core.train) -> per-epoch metric names
EPOCH_SERIES = {
    "train_loss": TRAIN_LOSS,
    "train_accuracy": TRAIN_ACCURACY,
    "val_loss": VAL_LOSS,
    "val_accuracy": VAL_ACCURACY,
    "lr": LR,
    "epoch_seconds": EPOCH_SECONDS,
}
