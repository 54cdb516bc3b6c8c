"""Ray job entry points, run from the repository root: `python -m jobs.<name> --config ...`,
locally or under `ray job submit --working-dir .`. Each parses and checks its config (no Ray,
no model) and then calls its pipeline in pipelines/. Not installed with the package: a job
runs from the uploaded working directory, so the code it runs is the code uploaded.

A regular package (not a namespace one) on purpose: `tests/jobs/` is a folder of the same
name, and a regular package always wins over namespace portions found on sys.path.
"""
