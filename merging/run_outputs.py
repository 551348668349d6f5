"""The names a merge run writes in its run folder beside config.yaml, metrics.json and its output folder. Every
writer takes its name from here, and `RUN_OUTPUTS` (what an overwrite rerun clears, `job.clear_earlier_outputs`) is
built from the same names, so an output cannot be written without being known to the clearing."""

TASK_PLOT = "task_accuracy.png"  # report: primary metric per task
MASK_PLOT = "mask_overlap.png"  # report: methods that measure mask overlap
STORE_DIR = "tall_store"  # tall_masks' store
COEFFICIENTS_DIR = "coefficients"  # a learned merge's λ (and per-step history)
COEFFICIENTS_PLOT = "coefficients.png"
CURVES_PLOT = "learning_curves.png"
MERGEKIT_RECIPE = "mergekit_config.yml"  # a mergekit run's recipe as run

RUN_OUTPUTS = (TASK_PLOT, MASK_PLOT, STORE_DIR, COEFFICIENTS_DIR, COEFFICIENTS_PLOT, CURVES_PLOT, MERGEKIT_RECIPE)
