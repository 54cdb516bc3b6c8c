"""Ray job entrypoints (`python jobs/<stage>.py --config ...`, locally or via `ray job submit`).

A regular package (not a namespace one) on purpose: `tests/jobs/` is a folder of the same
name, and a regular package always wins over namespace portions found on sys.path.
"""
