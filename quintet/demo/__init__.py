"""`make demo` (`python -m quintet.demo`): the whole lifecycle on data the project makes itself.

`lifecycle.py` runs the stages in order; `data.py`, `redteam.py`, `deploy.py` and `vision.py` hold the
demo's parts that print what a stage did. Everything a demo stage calls is a library function (and a CLI
command) of its stage package; nothing here is imported by the stages.
"""
