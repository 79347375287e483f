"""One quantization job: run.py (the job), loop.py (the only loop over layers), stages.py,
store.py (the output directory), weights.py (where the weights live), ablate.py (a grid of jobs)."""
