"""Run every step — extract → train → evaluate → interpret — with checks, a plan, resume and a summary.

Checks come first (packages, dataset, model, device and dtype, free disk, API key), then a plan:
each step with what it reads and writes, its examples and tokens, the store's size and a time
estimate measured on this machine, and which steps are skipped because their outputs are current.
After a y/N confirmation (or --yes) the steps run in order and a summary closes the run.

Each step is configured by the constants in its own script: edit train_sae.py and rerun this to
re-train (and re-evaluate and re-interpret). A step is skipped when its outputs exist and its
settings, and those of the steps before it, are unchanged (see pipeline_state.json); --force
re-runs all, --steps and --from choose. A failed or interrupted run resumes where it stopped.
"""

STEPS = "extract,train,evaluate,interpret"  # the steps to consider, in this order
FROM = ""  # start at this step, e.g. "train": it and the ones after it
FORCE = False  # re-run the chosen steps even when their outputs are current
YES = False  # run without the y/N question (needed when there is no terminal)
PLAN_ONLY = False  # print the checks and the plan, run nothing
SCRIPTS_DIR = "."  # where the four step scripts (and so the steps' settings) are read from

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.pipeline.run_pipeline import PipelineConfig, run_pipeline

    run_step(PipelineConfig, globals(), run_pipeline, description=__doc__)
